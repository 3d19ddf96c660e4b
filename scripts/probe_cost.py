"""Usage: python scripts/probe_cost.py 4|all [repeats]   (4: the landscape study's layers; all: every layer)

CPU time of a probed step relative to a normal training step (forward + backward + SGD step), interleaved.
VGG-11 (width 1/4), batch 128 of 32x32 images (CIFAR-10 shape), 1 thread; process CPU time, so the load of
other processes on the machine matters little."""
import statistics, sys, time
import torch
import torch.nn.functional as F
from types import SimpleNamespace
import normablate as nb
from normablate.config import ProbeConfig
from normablate.probes import ProbeCallback
from normablate.probes.callback import _rng_state

torch.set_num_threads(1)
torch.manual_seed(0)
layers = None if sys.argv[1] == "all" else ["features.0.conv", "features.4.conv", "features.8.conv", "head"]
model = nb.models.create("vgg11", norm="bn", width=0.25)
model.train()
opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
mod = SimpleNamespace(model=model, loss=lambda b: F.cross_entropy(model(b[0]), b[1]))
cb = ProbeCallback(model, ProbeConfig(enabled=True, layers=layers))

def normal_step():
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()

def probed_step():
    pre = {"x": [p.detach().clone() for p in cb.params], "buffers": cb._buffers(model), "rng": _rng_state(torch.device("cpu")),
           "lr": 0.02, "device": torch.device("cpu")}
    normal_step()
    cb.measure(mod, (x, y), pre)

for _ in range(2):
    normal_step(); probed_step()
ratios = []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 8):
    t0 = time.process_time(); normal_step(); t1 = time.process_time(); probed_step(); t2 = time.process_time()
    ratios.append((t2 - t1) / (t1 - t0))
print(f"layers={'all 9' if layers is None else len(layers)}: probed/normal step CPU time median {statistics.median(ratios):.1f} "
      f"(min {min(ratios):.1f}, max {max(ratios):.1f}, n={len(ratios)}); normal step {t1 - t0:.3f}s CPU")
