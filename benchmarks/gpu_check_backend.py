"""GPU check of the backend end to end: tiny random Llama models through torch.compile with
backend="minference" on CUDA (bf16 and fp16, SDPA and eager attention, padding, GQA), against
the same model compiled with Inductor and against the masked-dense model. Prints PASS/FAIL
lines and exits non-zero on a failure.

    PYTHONPATH=. python benchmarks/gpu_check_backend.py
"""

import sys

import torch
from torch._dynamo.utils import counters

import mcompile
from mcompile.kernels import dispatch
from mcompile.models import tiny_llama

SPARSE = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 30, "slash": 100}}
COVER = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 8192, "slash": 8192}}


def run(model, ids, backend, options=None, **kw):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, options=options) if options else torch.compile(model, backend=backend)
    with torch.no_grad():
        return compiled(ids, **kw).logits.float(), dict(counters["mcompile"])


def main() -> int:
    assert torch.cuda.is_available(), "needs a GPU"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"transformers {__import__('transformers').__version__}  triton {__import__('triton').__version__}")
    failures = 0
    for impl in ("sdpa", "eager"):
        for dtype in (torch.bfloat16, torch.float16):
            for padded in (False, True):
                model = tiny_llama(impl, layers=2, heads=8, kv_heads=2, head_dim=64).to("cuda", dtype)
                ids = torch.randint(0, 128, (2, 1000), device="cuda")
                kw = {}
                if padded:
                    kw["attention_mask"] = torch.ones_like(ids)
                    kw["attention_mask"][0, :37] = 0
                q = dispatch.triton_reason(torch.empty(1, 8, 64, 64, device="cuda", dtype=dtype))
                dense, _ = run(model, ids, "inductor", **kw)
                cover, c1 = run(model, ids, mcompile.minference_backend, COVER, **kw)
                sparse, c2 = run(model, ids, mcompile.minference_backend, SPARSE, **kw)
                # The masked-dense model: same estimated index, attention dense with the mask materialised.
                orig = dispatch.attention_impl
                from mcompile.index import index_to_mask

                def masked(qq):
                    def f(q_, k_, v_, index, scale, kp):
                        g = q_.shape[1] // k_.shape[1]
                        m = index_to_mask(index, q_.shape[2], kp)
                        o = torch.nn.functional.scaled_dot_product_attention(
                            q_.float(), k_.float().repeat_interleave(g, 1), v_.float().repeat_interleave(g, 1),
                            attn_mask=m, scale=scale)
                        return torch.where(m.any(-1, keepdim=True), o, 0).to(q_.dtype)
                    return f
                dispatch.attention_impl = masked
                try:
                    ref_sparse, _ = run(model, ids, mcompile.minference_backend, SPARSE, **kw)
                finally:
                    dispatch.attention_impl = orig
                scale = dense[1].abs().max().item()
                e_cover = (cover - dense)[1].abs().max().item() / scale
                e_sparse = (sparse - ref_sparse)[1].abs().max().item() / scale
                e_drop = (sparse - dense)[1].abs().max().item() / scale
                ok = (c1.get("rewritten") == 2 and c2.get("rewritten") == 2 and e_cover < 3e-2 and e_sparse < 3e-2
                      and e_drop > e_sparse and q is None)
                failures += not ok
                print(f"{'PASS' if ok else 'FAIL'} {impl:5} {str(dtype):15} pad={padded!s:5} triton={'yes' if q is None else q} "
                      f"rewritten={c2.get('rewritten')} err(cover vs inductor)={e_cover:.2e} "
                      f"err(sparse vs masked dense)={e_sparse:.2e} (sparse vs dense {e_drop:.2e})", flush=True)
    print("backend check", "PASS" if not failures else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
