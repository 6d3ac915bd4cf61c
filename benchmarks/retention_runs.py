"""The bench runs of docs/results.md (session 2), by name. Each writes results.json, results.md and
gap_recovered.png into runs/NAME; LoRAs are cached in runs/NAME/loras.

  OMP_NUM_THREADS=1 python benchmarks/retention_runs.py m6
"""

import sys

from castlora.bench import BenchConfig, bench

GEN = ["cast0", "random_heads", "weight_space", "cast_source_gen", "imitation_gen"]
ALL = ("cast_auto_gen_all", "imitation_auto_gen_all")  # the default since session 14 and its control
EXACT = ("cast_delta_gen_zd", "imitation_gen_zd")  # the exact-match recipe and its control
EXACT_AUTO = ("cast_auto_gen_zd", "imitation_auto_gen_zd")  # the same with --teacher auto (session 16)


def side_by_side(cast_run: str, control_run: str, pair: str, task: str, methods: tuple, **options) -> dict:
    """Two runs, a CAST row and its imitation control, on one pair and task (150 steps, 1,200 generated
    texts unless `options` say otherwise), so that the two can run on the two cores at once."""
    options = {"cast_steps": 150, "generate": 1200, **options}
    return {run: dict(pairs=[pair], tasks=[task], methods=[method], **options)
            for run, method in zip((cast_run, control_run), methods)}


RUNS = {
    # shakespeare llama->mistral after the CAST-0 fix, the session-1 recipe (150 steps)
    "m5": dict(pairs=["llama->mistral"], tasks=["shakespeare"], methods=["cast0", "cast_source_gen", "imitation_gen"],
               cast_steps=150, generate=400),
    # the steps lever: 400 steps, the generated share kept at 1/3 of the stream
    "m6": dict(pairs=["llama->mistral"], tasks=["shakespeare"], methods=["cast_source_gen", "imitation_gen"],
               cast_steps=400, generate=1067),
    # greet over the five pairs (exact-task LoRA recipe: BenchConfig.exact_lora_*)
    "m7": dict(pairs=["llama->llama", "llama->mistral", "mistral->llama", "neox->llama", "llama->neox"],
               tasks=["greet"], methods=GEN, cast_steps=100, generate=400),
    # kjv llama->mistral, the shakespeare recipe
    "m8": dict(pairs=["llama->mistral"], tasks=["kjv"], methods=GEN + ["cast_delta_gen"], cast_steps=150, generate=400),
    # echo: the sanity pair and llama->neox (neox's echo LoRA learns it best)
    "m9": dict(pairs=["llama->llama", "llama->neox"], tasks=["echo"], methods=GEN, cast_steps=100, generate=400),
    # session 3: the rest of the shakespeare matrix (m10-m12) and kjv on two more pairs (m13); the
    # shakespeare LoRAs are those of m1/m2 (same recipe and seed), copied into runs/NAME/loras
    "m10": dict(pairs=["llama->neox"], tasks=["shakespeare"], methods=GEN + ["cast_delta_gen"], cast_steps=150,
                generate=400),
    "m11": dict(pairs=["mistral->llama", "neox->llama"], tasks=["shakespeare"], methods=GEN, cast_steps=150,
                generate=400),
    "m12": dict(pairs=["llama->llama"], tasks=["shakespeare"], methods=GEN, cast_steps=150, generate=400),
    "m13": dict(pairs=["llama->neox", "mistral->llama"], tasks=["kjv"], methods=GEN, cast_steps=150, generate=400),
    # the exact-match recipe chosen on validation (benchmarks/levers.py): zero-delta start, delta
    # teacher, lr 1e-2, with its imitation control; LoRAs copied from m7 (greet) and m9 (echo)
    "m14": dict(pairs=["llama->mistral", "mistral->llama", "neox->llama", "llama->neox"], tasks=["greet"],
                methods=["cast_delta_gen_zd", "imitation_gen_zd"], cast_steps=100, generate=400),
    "m15": dict(pairs=["llama->neox"], tasks=["echo"], methods=["cast_delta_gen_zd", "imitation_gen_zd"],
                cast_steps=100, generate=400),
    # session 4: the default recipe after the start was chosen on validation text (init auto = the scaled
    # closed-form start, lr 1e-2), with its imitation control, on the four cross-family shakespeare pairs;
    # LoRAs copied from m12 (llama) and the lever folders (mistral, neox), same recipe and seed
    "m16a": dict(pairs=["llama->mistral", "llama->neox"], tasks=["shakespeare"],
                 methods=["cast_source_gen", "imitation_gen"], cast_steps=150, generate=400),
    "m16b": dict(pairs=["mistral->llama", "neox->llama"], tasks=["shakespeare"],
                 methods=["cast_source_gen", "imitation_gen"], cast_steps=150, generate=400),
    # the sanity pair with the session-4 default (LoRA copied from m12)
    "m17": dict(pairs=["llama->llama"], tasks=["shakespeare"], methods=["cast_source_gen", "imitation_gen"],
                cast_steps=150, generate=400),
    # kjv llama->mistral with the session-4 default (m8 had the old recipe)
    "m18": dict(pairs=["llama->mistral"], tasks=["kjv"], methods=["cast_source_gen", "imitation_gen"],
                cast_steps=150, generate=400),
    # session 5: the default lr 3e-2 (chosen on validation text), every shakespeare pair; LoRAs copied
    # from m16a/m16b/m17 (same recipe and seed)
    "m19a": dict(pairs=["llama->mistral", "neox->llama"], tasks=["shakespeare"],
                 methods=["cast_source_gen", "imitation_gen"], cast_steps=150, generate=400),
    "m19b": dict(pairs=["llama->neox", "mistral->llama"], tasks=["shakespeare"],
                 methods=["cast_source_gen", "imitation_gen"], cast_steps=150, generate=400),
    "m19c": dict(pairs=["llama->llama"], tasks=["shakespeare"], methods=["cast_source_gen"], cast_steps=150,
                 generate=400),
    # session 6: kjv on the other cross-family pairs with the session-5 default (lr 3e-2); the llama
    # and mistral kjv LoRAs copied from m18 (same recipe and seed), neox's trained here
    "m20a": dict(pairs=["llama->neox", "neox->llama"], tasks=["kjv"], methods=GEN, cast_steps=150, generate=400),
    "m20b": dict(pairs=["mistral->llama"], tasks=["kjv"], methods=GEN, cast_steps=150, generate=400),
    # kjv neox->llama split in two so that CAST and its control run side by side on the two cores;
    # the LoRAs of m20a (llama's copied from m18, neox's trained there)
    "m20c": dict(pairs=["neox->llama"], tasks=["kjv"], methods=GEN[:-1], cast_steps=150, generate=400),
    "m20d": dict(pairs=["neox->llama"], tasks=["kjv"], methods=["imitation_gen"], cast_steps=150, generate=400),
    # session 7: kjv llama->neox, CAST and its control side by side (m20a ran its data-free rows);
    # the LoRAs of m20a copied into runs/m21a/loras and runs/m21b/loras
    "m21a": dict(pairs=["llama->neox"], tasks=["kjv"], methods=["cast_source_gen"], cast_steps=150, generate=400),
    "m21b": dict(pairs=["llama->neox"], tasks=["kjv"], methods=["imitation_gen"], cast_steps=150, generate=400),
    # a second CAST seed (data order, generated text, calibration batches, auto's documents) on the same
    # LoRAs, copied from m19a: how far one seed moves a cell. Set up in session 7, run in session 9 with
    # the default then (auto: the source teacher for llama->mistral, the blend for neox->llama)
    "m22a": dict(pairs=["llama->mistral"], tasks=["shakespeare"], methods=["cast_auto_gen"], cast_steps=150,
                 generate=400, seed=1),
    "m22b": dict(pairs=["neox->llama"], tasks=["shakespeare"], methods=["cast_auto_gen"], cast_steps=150,
                 generate=400, seed=1),
    # the blend teacher (w 0.5, chosen on validation text in session 7) and its control side by side,
    # every cross-family shakespeare pair; the LoRAs of m19a (same recipe and seed)
    "m23a": dict(pairs=["neox->llama", "mistral->llama", "llama->neox", "llama->mistral"], tasks=["shakespeare"],
                 methods=["cast_blend_gen"], cast_steps=150, generate=400),
    "m23b": dict(pairs=["neox->llama", "mistral->llama", "llama->neox", "llama->mistral"], tasks=["shakespeare"],
                 methods=["imitation_blend_gen"], cast_steps=150, generate=400),
    # kjv neox->llama, where auto takes the blend: CAST and its control side by side; LoRAs of m20c
    "m24a": dict(pairs=["neox->llama"], tasks=["kjv"], methods=["cast_blend_gen"], cast_steps=150, generate=400),
    "m24b": dict(pairs=["neox->llama"], tasks=["kjv"], methods=["imitation_blend_gen"], cast_steps=150, generate=400),
    # session 8: the paper's 1,000 steps on the weakest cell (shakespeare neox->llama, the blend that
    # auto picks there) and its control side by side; 1,000 generated texts (1/8 of the stream, as in
    # the 400-step lever that helped this pair) to keep generation near 10 CPU minutes; LoRAs of m23a
    "m25a": dict(pairs=["neox->llama"], tasks=["shakespeare"], methods=["cast_blend_gen"], cast_steps=1000,
                 generate=1000),
    "m25b": dict(pairs=["neox->llama"], tasks=["shakespeare"], methods=["imitation_blend_gen"], cast_steps=1000,
                 generate=1000),
    # the default (--teacher auto, strength measured on general/valid) and its control on kjv
    # mistral->llama, where auto now takes the blend; the LoRAs of m20b
    "m26a": dict(pairs=["mistral->llama"], tasks=["kjv"], methods=["cast_auto_gen"], cast_steps=150, generate=400),
    "m26b": dict(pairs=["mistral->llama"], tasks=["kjv"], methods=["imitation_auto_gen"], cast_steps=150,
                 generate=400),
    # session 9: a second seed on mistral->llama too (auto: the blend); LoRAs of m19b
    "m22c": dict(pairs=["mistral->llama"], tasks=["shakespeare"], methods=["cast_auto_gen"], cast_steps=150,
                 generate=400, seed=1),
    # the blend on a stream two thirds generated (800 texts; it gained +0.037 on validation text,
    # session 9) and its control, shakespeare neox->llama; the LoRAs of m23a
    "m28a": dict(pairs=["neox->llama"], tasks=["shakespeare"], methods=["cast_blend_gen23"], cast_steps=150,
                 generate=800),
    "m28b": dict(pairs=["neox->llama"], tasks=["shakespeare"], methods=["imitation_blend_gen23"], cast_steps=150,
                 generate=800),
    # the default (auto: the source teacher here) and its control on kjv llama->mistral,
    # whose cell was still the session-4 recipe's (m18); the LoRAs of m18
    "m27a": dict(pairs=["llama->mistral"], tasks=["kjv"], methods=["cast_auto_gen"], cast_steps=150, generate=400),
    "m27b": dict(pairs=["llama->mistral"], tasks=["kjv"], methods=["imitation_auto_gen"], cast_steps=150,
                 generate=400),
    # session 10: greet on the four cross-family pairs with the default (auto) and its control, in two
    # folders run side by side; the m7 recipe otherwise (100 steps, the exact-task LoRAs)
    "m29a": dict(pairs=["llama->mistral", "neox->llama"], tasks=["greet"],
                 methods=["cast_auto_gen", "imitation_auto_gen"], cast_steps=100, generate=400),
    "m29b": dict(pairs=["mistral->llama", "llama->neox"], tasks=["greet"],
                 methods=["cast_auto_gen", "imitation_auto_gen"], cast_steps=100, generate=400),
    # --cover-layers on shakespeare mistral->llama (4 -> 6 layers: the proportional map leaves llama's layers
    # 1 and 4 without a kernel), the default otherwise, and its control; the LoRAs of m23a
    "m30a": dict(pairs=["mistral->llama"], tasks=["shakespeare"], methods=["cast_auto_gen_cover"], cast_steps=150,
                 generate=400),
    "m30b": dict(pairs=["mistral->llama"], tasks=["shakespeare"], methods=["imitation_auto_gen_cover"],
                 cast_steps=150, generate=400),
    # session 12: the default trained at the scoring context (256 source tokens, batch 4: the same tokens per
    # step), shakespeare neox->llama (auto: the blend), and its control; the LoRAs copied from runs/lev_nl/loras
    # (levers.py trains them with the bench's recipe and seed: the same test scores as m23a's)
    "m31a": dict(pairs=["neox->llama"], tasks=["shakespeare"], methods=["cast_auto_gen_s256"], cast_steps=150,
                 generate=400),
    "m31b": dict(pairs=["neox->llama"], tasks=["shakespeare"], methods=["imitation_auto_gen_s256"], cast_steps=150,
                 generate=400),
    # session 13: the default on a stream of generated text only (1,200 texts: every training text), shakespeare
    # neox->llama (auto: the blend), and its control; the LoRAs copied from runs/lev_nl/loras as for m31
    **side_by_side("m32a", "m32b", "neox->llama", "shakespeare", ALL),
    # the same on mistral->llama (auto: the blend; LoRAs from runs/lev_ml/loras) and llama->mistral (auto: the
    # source; LoRAs from runs/lev_lm/loras)
    **side_by_side("m32c", "m32d", "mistral->llama", "shakespeare", ALL),
    **side_by_side("m32e", "m32f", "llama->mistral", "shakespeare", ALL),
    # session 14: the same on kjv, the two llama-target cells (auto: the blend), each with its control; the LoRAs
    # copied from runs/lev_kjv/loras (levers.py, the bench's recipe and seed)
    **side_by_side("m33a", "m33b", "neox->llama", "kjv", ALL),
    **side_by_side("m33c", "m33d", "mistral->llama", "kjv", ALL),
    # session 14: --mix 1 became the default; the cells it was not yet measured on, each with its control (auto:
    # the source). LoRAs copied from runs/lev_kjv/loras (kjv) and runs/lev_nl/loras (shakespeare llama, neox)
    **side_by_side("m34a", "m34b", "llama->mistral", "kjv", ALL),
    **side_by_side("m34c", "m34d", "llama->neox", "shakespeare", ALL),
    **side_by_side("m34e", "m34f", "llama->neox", "kjv", ALL),
    # session 14: greet llama->mistral with the exact-match recipe, a third (a, b) and all (c, d) of the stream
    # generated, each with its control, on one pair of LoRAs (copied from runs/lev_greet/loras)
    **side_by_side("m35a", "m35b", "llama->mistral", "greet", EXACT, cast_steps=100, generate=-1),
    **side_by_side("m35c", "m35d", "llama->mistral", "greet", EXACT, cast_steps=100, generate=-1, mix=1.0),
    # session 15: the sanity pair with the session-14 default (LoRA copied from runs/lev_nl/loras), and echo
    # llama->neox with the exact-match recipe on a stream of generated text only (the bench trains the echo LoRAs)
    **side_by_side("m36a", "m36b", "llama->llama", "shakespeare", ALL),
    **side_by_side("m36c", "m36d", "llama->neox", "echo", EXACT, cast_steps=100, generate=-1, mix=1.0),
    # session 16: a second CAST seed with the session-14 default on the two weakest shakespeare test cells
    # (auto: the blend), the same LoRAs as m32a and m32c (copied from there): how far one seed moves a test cell
    "m37a": dict(pairs=["neox->llama"], tasks=["shakespeare"], methods=[ALL[0]], cast_steps=150, generate=1200,
                 seed=1),
    "m37b": dict(pairs=["mistral->llama"], tasks=["shakespeare"], methods=[ALL[0]], cast_steps=150, generate=1200,
                 seed=1),
    # the same on the two weakest kjv cells, the LoRAs of m33a and m33c
    "m37c": dict(pairs=["neox->llama"], tasks=["kjv"], methods=[ALL[0]], cast_steps=150, generate=1200, seed=1),
    "m37d": dict(pairs=["mistral->llama"], tasks=["kjv"], methods=[ALL[0]], cast_steps=150, generate=1200, seed=1),
    # session 16: the exact-match recipe with --teacher auto instead of the delta teacher, every text generated,
    # each with its control: greet llama->mistral (LoRAs of m35c) and mistral->llama (the delta recipe too there;
    # LoRAs from runs/lev_greet/loras, as m35's), echo llama->neox (LoRAs of m36c)
    **side_by_side("m38a", "m38b", "llama->mistral", "greet", EXACT_AUTO, cast_steps=100, generate=-1, mix=1.0),
    **side_by_side("m38c", "m38d", "mistral->llama", "greet", EXACT, cast_steps=100, generate=-1, mix=1.0),
    **side_by_side("m38e", "m38f", "mistral->llama", "greet", EXACT_AUTO, cast_steps=100, generate=-1, mix=1.0),
    **side_by_side("m38g", "m38h", "llama->neox", "echo", EXACT_AUTO, cast_steps=100, generate=-1, mix=1.0),
    # the two other greet pairs, both recipes, each with its control (llama's LoRA from runs/lev_greet/loras;
    # neox's trained by m39a with the bench's recipe and seed, then copied)
    **side_by_side("m39a", "m39b", "neox->llama", "greet", EXACT, cast_steps=100, generate=-1, mix=1.0),
    **side_by_side("m39c", "m39d", "neox->llama", "greet", EXACT_AUTO, cast_steps=100, generate=-1, mix=1.0),
    **side_by_side("m39e", "m39f", "llama->neox", "greet", EXACT, cast_steps=100, generate=-1, mix=1.0),
    **side_by_side("m39g", "m39h", "llama->neox", "greet", EXACT_AUTO, cast_steps=100, generate=-1, mix=1.0),
    # session 17: a second CAST seed on the four llama-source LM test cells (auto: the source), so that every
    # cross-family LM cell has two; the LoRAs of m32e, m34c, m34a and m34e (copied from there)
    **{run: dict(pairs=[pair], tasks=[task], methods=[method], cast_steps=150, generate=1200, seed=1)
       for run, pair, task, method in [
           ("m40a", "llama->mistral", "shakespeare", ALL[0]), ("m40b", "llama->neox", "shakespeare", ALL[0]),
           ("m40c", "llama->mistral", "kjv", ALL[0]), ("m40d", "llama->neox", "kjv", ALL[0]),
           # and the imitation controls of session 16's seed-1 rows (m37a-d; the blend), the same LoRAs
           ("m41a", "neox->llama", "shakespeare", ALL[1]), ("m41b", "mistral->llama", "shakespeare", ALL[1]),
           ("m41c", "neox->llama", "kjv", ALL[1]), ("m41d", "mistral->llama", "kjv", ALL[1])]},
    # session 17: a second CAST seed (cast_seed: the tasks and LoRAs stay seed 0's) on the exact-match cells of
    # m35c, m38a, m38c, m38e, m39a, m39c, m39e, m39g, m36c and m38g, each recipe (delta, auto), LoRAs copied from there
    **{run: dict(pairs=[pair], tasks=[task], methods=[recipe[0]], cast_steps=100, generate=-1, mix=1.0, cast_seed=1)
       for run, pair, task, recipe in [
           ("m42a", "llama->mistral", "greet", EXACT), ("m42b", "llama->mistral", "greet", EXACT_AUTO),
           ("m42c", "mistral->llama", "greet", EXACT), ("m42d", "mistral->llama", "greet", EXACT_AUTO),
           ("m42e", "neox->llama", "greet", EXACT), ("m42f", "neox->llama", "greet", EXACT_AUTO),
           ("m42g", "llama->neox", "greet", EXACT), ("m42h", "llama->neox", "greet", EXACT_AUTO),
           ("m42i", "llama->neox", "echo", EXACT), ("m42j", "llama->neox", "echo", EXACT_AUTO)]},
    # the LM default (lr 3e-2, scaled start, auto) on echo llama->neox, with its control (LoRAs of m36c)
    **side_by_side("m43a", "m43b", "llama->neox", "echo", ALL, cast_steps=100, generate=-1, mix=1.0),
    # the second seed of the rest: the sanity pair (LoRA of m36a) and the llama-source cells' controls (m40a-d's LoRAs)
    **{run: dict(pairs=[pair], tasks=[task], methods=[method], cast_steps=150, generate=1200, seed=1)
       for run, pair, task, method in [
           ("m44a", "llama->llama", "shakespeare", ALL[0]), ("m44b", "llama->mistral", "shakespeare", ALL[1]),
           ("m44c", "llama->neox", "shakespeare", ALL[1]), ("m44d", "llama->mistral", "kjv", ALL[1]),
           ("m44e", "llama->neox", "kjv", ALL[1])]},
    # session 18: a third seed on every cross-family LM test cell (the LoRAs of m37a-d and m40a-d, copied from
    # there), and on the llama-source cells' controls, the seed-sensitive ones (m45e-h's LoRAs)
    **{run: dict(pairs=[pair], tasks=[task], methods=[method], cast_steps=150, generate=1200, seed=2)
       for run, pair, task, method in [
           ("m45a", "neox->llama", "shakespeare", ALL[0]), ("m45b", "mistral->llama", "shakespeare", ALL[0]),
           ("m45c", "neox->llama", "kjv", ALL[0]), ("m45d", "mistral->llama", "kjv", ALL[0]),
           ("m45e", "llama->mistral", "shakespeare", ALL[0]), ("m45f", "llama->neox", "shakespeare", ALL[0]),
           ("m45g", "llama->mistral", "kjv", ALL[0]), ("m45h", "llama->neox", "kjv", ALL[0]),
           ("m46a", "llama->mistral", "shakespeare", ALL[1]), ("m46b", "llama->neox", "shakespeare", ALL[1]),
           ("m46c", "llama->mistral", "kjv", ALL[1]), ("m46d", "llama->neox", "kjv", ALL[1])]},
    # session 19: the seed-2 controls of the blend cells (m45a-d's LoRAs, copied from there)
    **{run: dict(pairs=[pair], tasks=[task], methods=[ALL[1]], cast_steps=150, generate=1200, seed=2)
       for run, pair, task in [
           ("m47a", "neox->llama", "shakespeare"), ("m47b", "mistral->llama", "shakespeare"),
           ("m47c", "neox->llama", "kjv"), ("m47d", "mistral->llama", "kjv")]},
    # session 21: the exact-match recipe with auto at 400 steps instead of 100 (chosen on validation names: greet
    # llama->mistral +0.093, mistral->llama +0.027), each with its control; the LoRAs of m38a, m38e, m39c and m39g
    **side_by_side("m48a", "m48b", "llama->mistral", "greet", EXACT_AUTO, cast_steps=400, generate=-1, mix=1.0),
    **side_by_side("m48c", "m48d", "mistral->llama", "greet", EXACT_AUTO, cast_steps=400, generate=-1, mix=1.0),
    **side_by_side("m48e", "m48f", "neox->llama", "greet", EXACT_AUTO, cast_steps=400, generate=-1, mix=1.0),
    **side_by_side("m48g", "m48h", "llama->neox", "greet", EXACT_AUTO, cast_steps=400, generate=-1, mix=1.0),
    # and a second CAST seed of each (cast_seed: the tasks and LoRAs stay seed 0's; the LoRAs of m48a, c, e and g)
    **{run: dict(pairs=[pair], tasks=["greet"], methods=[EXACT_AUTO[0]], cast_steps=400, generate=-1, mix=1.0,
                 cast_seed=1)
       for run, pair in [("m49a", "llama->mistral"), ("m49b", "mistral->llama"), ("m49c", "neox->llama"),
                         ("m49d", "llama->neox")]},
    # echo llama->neox with its recipe (the delta teacher) at 400 steps, with its control (the LoRAs of m36c)
    **side_by_side("m50a", "m50b", "llama->neox", "echo", EXACT, cast_steps=400, generate=-1, mix=1.0),
    # greet llama->mistral with the delta recipe at 400 steps (the bench's other exact-match row; LoRAs of m48a)
    "m50c": dict(pairs=["llama->mistral"], tasks=["greet"], methods=[EXACT[0]], cast_steps=400, generate=-1, mix=1.0),
}

name = sys.argv[1]
# Every run here trained at the --mix of its day, a third of the stream generated (the default before session 14),
# except the rows whose method names its own (cast_auto_gen_all and its control: every text generated); and every
# run's cast_steps hold for its exact-match tasks too (exact_cast_steps 0), as before session 21; and every
# exact-match LoRA here trained 400 steps at a constant lr, as before session 26.
bench(BenchConfig(out=f"runs/{name}", lora_steps=150, batch_size=8, seq_len=128, eval_tokens=30000,
                  **{"mix": 1 / 3, "exact_cast_steps": 0, "exact_lora_schedule": "constant",
                     "exact_lora_steps": 400, **RUNS[name]}))
