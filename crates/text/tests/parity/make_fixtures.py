"""Writes the fixtures of `tests/transformers_parity.rs`: for each vocabulary, the TokenizerSpec
the model crate fills from the GGUF, and what `transformers` gives for thousands of strings,
random id sequences and chat conversations.

    python make_fixtures.py OUT_DIR [SMOLLM2_GGUF]
    TERN_TEXT_FIXTURES=OUT_DIR cargo test -p tern-text --test transformers_parity -- --nocapture

Needs transformers (5.x), tokenizers, gguf and sentencepiece. Besides the real SmolLM2 file (if
given), it trains small vocabularies on text found in the Python installation: SentencePiece BPE
with byte fallback (with and without BOS), and byte-level BPE with the llama-bpe, qwen2 and
default (GPT-2) split patterns, and writes them as tokenizer-only GGUF files the way llama.cpp's
converter does. Nothing it writes is meant to be committed.
"""
import json, os, random, sys
import gguf
import sentencepiece as spm
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, Regex
from transformers import AutoTokenizer

WORK = None  # set in __main__: OUT_DIR/work

MULTI = "Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße, Äpfel und Öl.\nLe cœur a ses raisons que la raison ne connaît point. Où est la bibliothèque? C'est l'été!\nEl niño comió una manzana en la mañana. ¿Dónde está el baño? ¡Qué día más bonito!\nСъешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир!\nΞεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε.\n我能吞下玻璃而不伤身体。你好，世界！今天天气很好，我们去公园散步吧。\n私はガラスを食べられます。それは私を傷つけません。こんにちは、世界！カタカナとひらがな。\n나는 유리를 먹을 수 있어요. 그래도 아프지 않아요. 안녕하세요 세계!\nأنا قادر على أكل الزجاج و هذا لا يؤلمني. مرحبا بالعالم!\nमैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती. नमस्ते दुनिया!\nฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ สวัสดีชาวโลก\nTôi có thể ăn thủy tinh mà không hại gì. Xin chào thế giới!\nEmoji time 😀😃😄 👍🏽 👨\u200d👩\u200d👧\u200d👦 🇺🇸🇫🇷 ❤️ 🎉🎉 ✨ 🤖 and café naïve résumé.\nNumbers 1234567890 3.14159 1,000,000 42nd 2024-01-01 0x1F 1e-9 ½ ² ³ ٣٤٥ ४२\nTabs\tand\tspaces    multiple   and newlines\n\nand carriage returns\n done. It's they're we've I'm you'll he'd IT'S THEY'RE.\n"

def build_corpus():
    """Python sources and docs of the installed packages, plus multilingual text."""
    import transformers, jinja2, tokenizers as tk
    site = os.path.dirname(os.path.dirname(transformers.__file__))
    sources = []
    for pkg in ("transformers/models/llama", "transformers/generation", "tokenizers", "jinja2"):
        for root, _, files in os.walk(os.path.join(site, pkg)):
            sources += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    code = "".join(open(p, encoding="utf-8", errors="replace").read() for p in sources[:40])
    with open(os.path.join(WORK, "code.txt"), "w", encoding="utf-8") as f:
        f.write(code)
    with open(os.path.join(WORK, "multi30.txt"), "w", encoding="utf-8") as f:
        f.write(MULTI * 30)
    return [os.path.join(WORK, "code.txt"), os.path.join(WORK, "multi30.txt")]

import gguf
import sentencepiece as spm
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, Regex, decoders


def writer(name, arch="llama"):
    w = gguf.GGUFWriter(os.path.join(WORK, name, name + ".gguf"), arch)
    w.add_context_length(2048); w.add_embedding_length(64); w.add_block_count(1)
    w.add_feed_forward_length(128); w.add_head_count(4); w.add_head_count_kv(4)
    w.add_rope_dimension_count(16); w.add_layer_norm_rms_eps(1e-5)
    return w

def finish(w):
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

def spm_gguf(name, add_space_prefix=True, add_bos=True, chat_template=None):
    os.makedirs(os.path.join(WORK, name), exist_ok=True)
    prefix = os.path.join(WORK, name, "spm")
    spm.SentencePieceTrainer.train(input=CORPUS, model_prefix=prefix, vocab_size=3000, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, user_defined_symbols=["<think>", "</think>", "<|tool|>"],
        control_symbols=["<|im_start|>", "<|im_end|>"], max_sentence_length=100000, num_threads=2,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i)); scores.append(sp.get_score(i))
        t = 1
        if sp.is_unknown(i): t = 2
        elif sp.is_control(i): t = 3
        elif sp.is_unused(i): t = 5
        elif sp.is_byte(i): t = 6
        elif tokens[-1] in ("<think>", "</think>", "<|tool|>"): t = 4
        types.append(t)
    w = writer(name)
    w.add_tokenizer_model("llama"); w.add_tokenizer_pre("default")
    w.add_token_list(tokens); w.add_token_scores(scores); w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id()); w.add_eos_token_id(sp.eos_id()); w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(add_bos); w.add_add_eos_token(False); w.add_add_space_prefix(add_space_prefix)
    if chat_template: w.add_chat_template(chat_template)
    finish(w)

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

def bpe_gguf(name, pre, split, specials, bos, eos, add_bos, user=()):
    os.makedirs(os.path.join(WORK, name), exist_ok=True)
    tok = Tokenizer(models.BPE())
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tr = trainers.BpeTrainer(vocab_size=4000, special_tokens=list(specials) + list(user),
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(CORPUS, tr)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]; merges = j["model"]["merges"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items(): tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in specials else 4 if t in user else 1 for t in tokens]
    w = writer(name)
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre(pre)
    w.add_token_list(tokens); w.add_token_types(types); w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(bos)); w.add_eos_token_id(tokens.index(eos))
    w.add_add_bos_token(add_bos)
    finish(w)


random.seed(1234)

def spec_of(path):
    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents() if k in r.fields else None
    model = f("tokenizer.ggml.model")
    flag = lambda k, d: bool(f(k)) if f(k) is not None else d
    return {
        "model": model, "pre": f("tokenizer.ggml.pre"),
        "tokens": f("tokenizer.ggml.tokens"),
        "scores": f("tokenizer.ggml.scores"),
        "token_types": f("tokenizer.ggml.token_type"),
        "merges": f("tokenizer.ggml.merges"),
        "bos": f("tokenizer.ggml.bos_token_id"), "eos": f("tokenizer.ggml.eos_token_id"),
        "unk": f("tokenizer.ggml.unknown_token_id"), "pad": f("tokenizer.ggml.padding_token_id"),
        "add_bos": flag("tokenizer.ggml.add_bos_token", model == "llama"),
        "add_eos": flag("tokenizer.ggml.add_eos_token", False),
        "add_space_prefix": flag("tokenizer.ggml.add_space_prefix", model == "llama"),
    }, f("tokenizer.chat_template")

POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") * 6 + list("0123456789") * 4
        + list("     ") * 6 + list("\n\n\t\r") + list(".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`") * 2
        + list("éèàüößçñÅøœ") + list("ЖжЯяДд") + list("中文字日本語한국어") + list("مرحبا") + list("नमस्ते")
        + ["😀", "👍🏽", "👨‍👩‍👧", "🇺🇸", "❤️", "\u200d", "\u0301", "\u00a0", "\u3000", "\u2028", "\u000b",
           "\u000c", "\u0085", "\ufeff", "\x00", "\x7f", "𝔘", "ﬁ", "²", "½", "٣", "Ⅻ", "'s", "'S", "'ll", "'T", "’s"])

HAND = [
    "", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", " \t ", "\r\n", "a", "Hello world", " Hello", "Hello ",
    "Hello  world", "Hello\n\nworld", "1234567 apples", "3.14159", "1,000,000", "12345678901234567890",
    "I'm it's you're we've they'll he'd I'M IT'S", "don't", "'s'", "''", "café naïve résumé", "Straße",
    "😀", "😀😀", "👨‍👩‍👧‍👦", "🇺🇸🇫🇷", "你好，世界！", "こんにちは", "안녕하세요", "مرحبا بالعالم", "नमस्ते",
    "def f(x):\n    return x + 1\n", "fn main() {\n\tprintln!(\"hi\");\n}", "for i in range(10):\n        pass",
    "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|><|im_end|>", "<|im_start", "<|im_start|", "<|im_end|>x",
    "x<|endoftext|>y", "<s>", "</s>", "<unk>", "<s>Hello", "Hello</s>", "a<s>b", "<think>hmm</think>",
    "<|begin_of_text|>hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "   leading", "trailing   ", "a  b   c    d", "\u00a0\u00a0x", "x\u3000y", "tab\tsep\tvalues",
    "<<>> <|||> <| |>", "http://example.com/a?b=c&d=e#f", "email@example.com", "C++ and C#", "$100.00 €50 £3",
    "ＦＵＬＬＷＩＤＴＨ", "ﬁancé", "e\u0301", "\ufeffBOM", "null\x00byte", "\u2028line\u2029para",
    "Ⅻ ½ ² ٣٤", "<0x41>", "▁x", "▁▁", "Ġ", "ĠĠhello", "  \n  \n", "\n\n\n", "a\r\r\nb", "x\u000by",
]

def rand_str(n):
    return "".join(random.choice(POOL) for _ in range(n))

def strings(specials):
    out = list(HAND)
    code = open(os.path.join(WORK, "code.txt"), encoding="utf-8").read()
    multi = MULTI
    for _ in range(1500):
        out.append(rand_str(random.randint(1, 40)))
    ws = [" ", " ", " ", "\n", "\t", "\r", "\u00a0", "\u3000", "\u2028", "\u000b", "\u000c", "\u0085", "\u200b",
          "a", "B", "1", "!", "é", "中", "'s", "\r\n"]
    for _ in range(4000):
        out.append("".join(random.choice(ws) for _ in range(random.randint(1, 16))))
    for _ in range(800):
        i = random.randrange(len(code)); out.append(code[i:i + random.randint(1, 400)])
    for line in multi.splitlines():
        out.append(line); out.append(" " + line)
    for _ in range(300):
        parts = []
        for _ in range(random.randint(1, 6)):
            r = random.random()
            if r < 0.3 and specials:
                parts.append(random.choice(specials))
            elif r < 0.4 and specials:
                s = random.choice(specials); parts.append(s[: random.randint(1, len(s))])
            else:
                parts.append(rand_str(random.randint(0, 12)))
        out.append("".join(parts))
    for _ in range(5):
        i = random.randrange(len(code) - 5000); out.append(code[i:i + 4096])
    out.append(multi)
    return out


LLAMA3_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions." }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {{- raise_exception("This model only supports single tool-calls at once!") }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"

GEMMA = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

STRESS = """{# exercises Jinja2/Python behaviour #}
{%- set ns = namespace(n=0, roles=[]) -%}
{% for m in messages %}
  {% set ns.n = ns.n + m.content|length %}
  [{{ loop.index }}/{{ loop.length }} {{ loop.revindex0 }} {{ loop.first }} {{ loop.last }}] {{ m.role|upper }} {{ m.role.title() }} {{ m.role.capitalize() }}:
    {{ m.content.strip() }}|{{ m.content.lstrip() }}|{{ m.content.rstrip() }}|{{ m.content|trim }}
    {{ m.content.split() }} {{ m.content.split('a') }} {{ m.content.startswith('H') }} {{ m.content.endswith('!') }}
    {{ m.content.replace('a', 'A') }} {{ m.content.lower() }} {{ m.content.upper() }} {{ m.content.find('o') }}
    {{ m|tojson }} {{ m|tojson(indent=2) }} {{ m.content|tojson }} {{ m|tojson(sort_keys=true) }}
    {{ m.content[:5] }}{{ m.content[::-1] }} {{ m.content|length }} {{ m.content|wordcount }}
  {% if m.missing is defined %}defined{% else %}undefined{% endif %} {{ m.missing }} {{ m.get('role') }} {{ m.get('nope', 'dflt') }}
{% endfor %}
{{ ns.n }} {{ none }} {{ true }} {{ false }} {{ [1, 'a', none, true, 2.5] }} {{ {'k': 'v', 'n': [1, 2]} }} {{ 1.0 }} {{ 3 / 2 }} {{ 7 // 2 }} {{ 2 ** 10 }} {{ 1e20 }}
{{ messages|map(attribute='role')|list }} {{ messages|map(attribute='role')|join(', ') }} {{ messages|selectattr('role', 'equalto', 'user')|list|length }}
{{ messages|tojson }}
{{ '-' * 3 }} {{ 'x' ~ 1 ~ none }} {{ 'abc'|reverse }} {{ [3, 1, 2]|sort }} {{ [3, 1, 2]|max }} {{ range(3)|list }} {{ 'a,b'.split(',') }} {{ (1, 2) }}
{{ {'b': 1, 'a': [1.5, {'c': none}]}|tojson }} {{ {'b': 1, 'a': 2}|tojson(sort_keys=true) }} {{ "<&>'\\u00e9\\x01"|tojson }} {{ [1, [2, []], {}]|tojson(indent=1) }}
{%- if add_generation_prompt %}
GEN
{%- endif %}
"""

def convs():
    out = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."}],
        [{"role": "user", "content": "  spaced out  \n\n"}, {"role": "assistant", "content": "\n<think>\nhmm\n</think>\n\nanswer"}, {"role": "user", "content": "again"}],
        [{"role": "user", "content": "Unicode: café 😀 你好 \"quotes\" 'single' back\\slash <tag> & amp\ttab\u0001"}],
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
        [{"role": "user", "content": ""}],
        [{"role": "assistant", "content": "starts with assistant"}],
        [{"role": "tool", "content": "{\"x\": 1}"}, {"role": "user", "content": "ok"}],
    ]
    return out


def main(out_dir, smollm2):
    global WORK, CORPUS
    random.seed(1234)
    WORK = os.path.join(out_dir, "work")
    os.makedirs(WORK, exist_ok=True)
    CORPUS = build_corpus()
    spm_gguf("spm")
    spm_gguf("spm_nobos", add_bos=False)
    l3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", "<|reserved_special_token_10|>"]
    bpe_gguf("llama3", "llama-bpe", LLAMA3, l3, "<|begin_of_text|>", "<|eot_id|>", True, user=["<think>"])
    bpe_gguf("qwen2", "qwen2", QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_end|>", False)
    bpe_gguf("gpt2default", "default", None, ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", False)
    files = {name: (os.path.join(WORK, name), name + ".gguf")
             for name in ("spm", "spm_nobos", "llama3", "qwen2", "gpt2default")}
    if smollm2:
        files["smollm2"] = (os.path.dirname(os.path.abspath(smollm2)), os.path.basename(smollm2))
    for name, (d, fname) in files.items():
        spec, template = spec_of(os.path.join(d, fname))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
        types = spec["token_types"] or []
        specials = [t for t, ty in zip(spec["tokens"], types) if ty in (3, 4)]
        cases = []
        for s in strings(specials):
            ids = tok(s, add_special_tokens=False)["input_ids"]
            cases.append({"text": s, "ids": ids, "ids_special": tok(s, add_special_tokens=True)["input_ids"],
                          "decoded": tok.decode(ids)})
        n = len(spec["tokens"])
        decodes = []
        for limit, count, longest in ((n, 1000, 12), (min(n, 600), 500, 8)):
            for _ in range(count):
                ids = [random.randrange(limit) for _ in range(random.randint(1, longest))]
                decodes.append({"ids": ids, "text": tok.decode(ids)})
        out = {"spec": spec, "cases": cases, "decodes": decodes}
        if name == "smollm2":
            out["chats"] = chat_cases(tok)
        with open(os.path.join(out_dir, name + ".json"), "w") as fh:
            json.dump(out, fh, ensure_ascii=False)
        print(name, len(cases), "cases", len(decodes), "decodes", len(out.get("chats", [])), "chats")


def chat_cases(tok):
    templates = {"smollm2": tok.chat_template, "llama3": LLAMA3_TEMPLATE, "llama31": LLAMA31, "mistral": MISTRAL,
                 "gemma": GEMMA, "zephyr": ZEPHYR, "qwen3": QWEN3, "stress": STRESS}
    chats = []
    for name, t in templates.items():
        for msgs in convs():
            for agp in (True, False):
                try:
                    text = tok.apply_chat_template(msgs, chat_template=t, tokenize=False, add_generation_prompt=agp)
                    err = None
                except Exception as e:
                    text, err = None, str(e)
                chats.append({"name": name, "template": t, "bos": tok.bos_token, "eos": tok.eos_token,
                              "messages": msgs, "add_generation_prompt": agp, "text": text, "error": err})
    return chats


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
