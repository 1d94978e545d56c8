import torch, json, os, sys
from torch.utils.benchmark import Timer
res = {}
for d_out, r in [(12288, 16), (4096, 16), (12288, 384), (4096, 384), (1024, 16)]:
    dy = torch.randn(4096, d_out, device="cuda", dtype=torch.bfloat16)
    ax = torch.randn(4096, r, device="cuda", dtype=torch.bfloat16)
    for name, stmt in [("bf16", "torch.mm(dy.t(), ax)"), ("out_fp32", "torch.mm(dy.t(), ax, out_dtype=torch.float32)"),
                       ("bf16_then_float", "torch.mm(dy.t(), ax).float()")]:
        t = Timer(stmt, globals={"torch": torch, "dy": dy, "ax": ax}).blocked_autorange(min_run_time=0.3).median * 1e6
        res[f"{d_out}x{r} {name}"] = t
        print(f"{d_out:6d} r{r:4d} {name:16s} {t:8.1f} us", flush=True)
json.dump({"gpu": torch.cuda.get_device_name(), "us": res}, open(os.environ["OUT"] + "/mm_out_dtype.json", "w"), indent=1)
