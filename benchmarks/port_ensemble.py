"""Are a port's errors noise or system? Average several ports of one pair and score the average.

If the heads landed on different wrong answers from run to run, the mean of several ports' deltas
would score better than each one. This loads the named ports (levers.py variants of one source LoRA
and target) as adapters of one model, scores each, and scores their exact average: peft's
`add_weighted_adapter(..., combination_type="cat")` concatenates the LoRAs with weight 1/n each, a
LoRA of rank n*r whose delta is the mean of the ports' deltas. Validation text only (the last
training document, as in levers.py).

  OMP_NUM_THREADS=1 python benchmarks/port_ensemble.py shakespeare neox llama runs/lev_nl bl bl_s256b4 bl_s256b8
"""

from peft import PeftModel

from castlora.models import load_model
from lever_folder import lever_folder, validation_loss, with_adapter

lf = lever_folder()
if len(lf.ports) < 2:
    raise SystemExit("name at least two ports of DIR/ports to average")
base = validation_loss(lf, load_model(str(lf.zoo / lf.tgt)))
retrained = validation_loss(lf, with_adapter(lf, lf.tgt))
model = PeftModel.from_pretrained(load_model(str(lf.zoo / lf.tgt)), str(lf.out / "ports" / lf.ports[0]),
                                  adapter_name="p0")
names = [f"p{i}" for i in range(len(lf.ports))]
for name, port in zip(names[1:], lf.ports[1:]):
    model.load_adapter(str(lf.out / "ports" / port), adapter_name=name)
model.add_weighted_adapter(names, [1 / len(names)] * len(names), "mean", combination_type="cat")
model.eval()
print(f"{lf.task} {lf.src}->{lf.tgt}: validation base {base:.3f}, retrained {retrained:.3f}")
print("| port | loss | gap recovered |\n|---|---:|---:|")
for name, port in [*zip(names, lf.ports), ("mean", f"the mean of {len(names)}")]:
    model.set_adapter(name)
    value = validation_loss(lf, model)
    print(f"| {port} | {value:.3f} | {(base - value) / (base - retrained):.3f} |", flush=True)
