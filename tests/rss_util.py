"""Peak memory of one conversion, measured in a fresh process (``python -c RSS_SCRIPT REPO SRC OUT LABEL MAP
SHARD``).

The converter builds the model's skeleton (its parameter shapes, no weights) to know the tensors, so the
script imports the model families first; it then resets the process' peak RSS (``/proc/self/clear_refs``),
so what the imports once held does not hide what the conversion holds. It prints ``[base, peak]`` in KiB:
the resident set before the conversion and the peak during it.
"""
RSS_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from mindformers_ext.convert import convert
from mindformers_ext.families import load_families

load_families()
src, out, label, weight_map, shard = sys.argv[2:7]
kwargs = {"forward": dict(source=src, target=out + "/m.ckpt"),
          "forward_bf16": dict(source=src, target=out + "/b.ckpt", dtype="bfloat16"),
          "reverse": dict(source=out + "/m.ckpt", target=out + "/hf", reverse=True, config=src + "/config.json",
                          max_shard_size=shard)}[label]


def kib(field):
    with open("/proc/self/status") as f:
        return int([line for line in f if line.startswith(field + ":")][0].split()[1])


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = kib("VmRSS")
convert(weight_map=weight_map, progress=False, **kwargs)
print(json.dumps([base, kib("VmHWM")]))
"""
