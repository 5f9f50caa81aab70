"""What the backend costs the host below ``dense_below``, on the CPU: a 30-layer tiny Llama (hidden
64, 4 / 2 heads) at 64 tokens, where the compute is negligible and the wrapper's per-layer work
is what the time measures: plain Inductor against minference (default pattern, block-mass),
whose length test is in the graph either way, with the kernel in the opaque op
(``inline_kernels=False``) and with the kernel in the graph where the pattern allows
(``inline_kernels=True``). Median of interleaved repetitions.

    python -m benchmarks.host_overhead_cpu [reps]
"""
import statistics, time, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 128, (1, 64))
variants = {
    "inductor": dict(backend="inductor"),
    "minference kernel op": dict(backend="minference", options={"inline_kernels": False, "pattern_db": None}),
    "minference inline": dict(backend="minference", options={"inline_kernels": True, "pattern_db": None}),
}
fns = {}
import copy
for name, kw in variants.items():
    f = torch.compile(copy.deepcopy(model), dynamic=True, **kw)
    with torch.no_grad():
        f(ids, use_cache=False); f(torch.randint(0, 128, (1, 80)), use_cache=False)
    fns[name] = f
times = {n: [] for n in fns}
with torch.no_grad():
    for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 40):
        for n, f in fns.items():
            t = time.perf_counter(); f(ids, use_cache=False); times[n].append(time.perf_counter() - t)
for n, ts in times.items():
    print(f"{n:24s} median {1e3 * statistics.median(ts):7.2f} ms  min {1e3 * min(ts):7.2f} ms")
