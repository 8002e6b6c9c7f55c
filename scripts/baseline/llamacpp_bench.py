"""llama.cpp on the same GGUF, for `tern bench decode --baseline`: prints one JSON line with
prefill and decode tokens per second (median of repeats), measured like tern measures itself:
a prompt of N tokens evaluated in one call, then M tokens decoded one call each.

Needs the `llama-cpp-python` package (it builds llama.cpp from source); `tern bench decode
--baseline llama-cpp` sets up a virtual environment with it on first use.
"""

import json
import statistics
import sys
import time

from llama_cpp import Llama


def main():
    path, threads, n_prefill, n_decode, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_prefill + n_decode + 8,
                n_batch=max(n_prefill, 8), logits_all=False, verbose=False)
    unit = llm.tokenize(b"The quick brown fox jumps over the lazy dog while the sea rolls grey under a low sky. ", add_bos=False)
    prompt = (unit * (n_prefill // len(unit) + 1))[:n_prefill]
    prefill, decode = [], []
    for i in range(repeats + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        p = time.perf_counter() - t
        t = time.perf_counter()
        for j in range(n_decode):
            # Which token is fed does not change the work; llama-cpp-python keeps only the
            # last batch's logits unless asked for all, so feed the prompt's tokens again.
            llm.eval([unit[j % len(unit)]])
        d = time.perf_counter() - t
        if i > 0:  # the first round warms up
            prefill.append(p)
            decode.append(d)
    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python)",
        "prefill_tps": n_prefill / statistics.median(prefill),
        "decode_tps": n_decode / statistics.median(decode),
    }))


if __name__ == "__main__":
    main()
