"""What the reproduction trains: the two recipes, the methods, the paper's ablation variants (Tables 4/7),
the capacity probes, the validation sweep, and the priority queue of runs built from them."""
import json
from dataclasses import dataclass, field
from pathlib import Path

from .common import RESULTS

HERE = Path(__file__).resolve().parent
PAPER_ABLATIONS = HERE / "paper_ablations.json"

# name -> (train.py --method, --echo, extra train flags, display name)
METHODS = {
    "lora": ("lora", False, [], "LoRA"),
    "echo-lora": ("lora", True, [], "Echo-LoRA"),
    "dora": ("dora", False, [], "DoRA"),
    "echo-dora": ("dora", True, [], "Echo-DoRA"),
    "echo-lora-norouting": ("lora", True, ["--echo-p-start", "1", "--echo-p-end", "1"],
                            "Echo-LoRA, no routing (p = 1)"),
    # the paper's ablations (Tables 4 and 7), mapped onto SmolLM2's 30 layers: the paper's default targets
    # are layers 4-7 and its sources -8..-5; deep→deep moves the targets onto the source layers, and
    # shallow→shallow moves the sources onto the target layers (--echo-any-depth allows both)
    "A-1": ("lora", True, ["--echo-p-start", "1", "--echo-p-end", "1"], "A-1 w/o stochastic routing"),
    "A-2": ("lora", True, ["--echo-targets", "-8", "-7", "-6", "-5", "--echo-sources", "-8", "-7", "-6", "-5",
                           "--echo-any-depth"], "A-2 deep→deep"),
    "A-3": ("lora", True, ["--echo-targets", "4", "5", "6", "7", "--echo-sources", "4", "5", "6", "7",
                           "--echo-any-depth"], "A-3 shallow→shallow"),
    "A-4": ("lora", True, ["--echo-all-positions"], "A-4 w/o answer-only masking"),
    "A-5": ("lora", True, ["--echo-modules", "wv"], "A-5 v_proj only"),
    "A-6": ("lora", True, ["--echo-all-positions", "--echo-modules", "wq", "wk", "wv", "wo"],
            "A-6 w/o masking + all attention projections"),
    "A-7": ("lora", True, ["--echo-modules", "wq"], "A-7 q_proj only"),
    "A-8": ("lora", True, ["--echo-modules", "wq", "wk", "wv", "wo"], "A-8 all attention projections"),
    # capacity probes: the teacher trained alone (routing always on, λ_kd = 0); training only
    "probe-teacher-alone": ("lora", True, ["--echo-p-start", "1", "--echo-p-end", "1", "--echo-lambda-kd", "0"],
                            "teacher alone (p = 1, λ_kd = 0)"),
    "probe-teacher-alone-lambda1": ("lora", True, ["--echo-p-start", "1", "--echo-p-end", "1", "--echo-lambda-kd",
                                                   "0", "--echo-lambda-init", "1.0"], "teacher alone, λ_init 1.0"),
    "probe-teacher-alone-gate0": ("lora", True, ["--echo-p-start", "1", "--echo-p-end", "1", "--echo-lambda-kd",
                                                 "0", "--echo-gate-bias", "0"], "teacher alone, gate bias 0"),
}
MAIN_METHODS = ["lora", "echo-lora", "dora", "echo-dora"]
MAIN_SEEDS = [0, 1, 2]
N_MAIN = len(MAIN_METHODS) * len(MAIN_SEEDS)
ABLATIONS = [f"A-{i}" for i in range(1, 9)]
PROBES = ["probe-teacher-alone", "probe-teacher-alone-lambda1", "probe-teacher-alone-gate0"]
SWEEP_GRID = [(1, 2e-4), (1, 1e-3), (3, 2e-4), (3, 1e-3)]          # (epochs, lr), LoRA seed 0, validation only
EVAL_EVERY = 800                                                    # validation points of the sweep's curves
# (treated, control, the paper's delta of the 8-task average in points, or None)
COMPARISONS = [("echo-lora", "lora", 3.0), ("echo-dora", "dora", 2.7), ("echo-lora-norouting", "echo-lora", None)]
PAPER_DELTAS = {**{f"{a} vs {b}": d for a, b, d in COMPARISONS if d is not None},
                "note": "8-task average, 7-8B LLaMA models, all 8 train sets (commonsense_170k), beam search, "
                        "against the paper's own reproduced LoRA/DoRA"}

# flag -> (config.json opts key, kind) for the claim a run record must match
FLAG_KEYS = {"--echo-p-start": ("echo_p_start", float), "--echo-p-end": ("echo_p_end", float),
             "--echo-lambda-kd": ("echo_lambda_kd", float), "--echo-lambda-init": ("echo_lambda_init", float),
             "--echo-gate-bias": ("echo_gate_bias_init", float), "--echo-targets": ("echo_target_layers", list),
             "--echo-sources": ("echo_source_layers", list), "--echo-modules": ("echo_target_modules", list),
             "--echo-all-positions": ("echo_all_positions", bool), "--echo-any-depth": ("echo_any_depth", bool)}


@dataclass(frozen=True)
class Recipe:
    key: str
    label: str
    json: Path
    table: Path
    runs: Path
    sweep: Path
    flags: dict                       # train.py recipe flags (None: train.py's default)
    plan: str                         # "paper": the full queue; "main": methods x seeds only
    readme_marker: str
    layer_stem: str


RECIPES = {
    "paper": Recipe("paper", "the paper's recipe: 3 epochs, lr 2e-4 (train.py's defaults)",
                    RESULTS / "smollm2-135m-paper-recipe.json", RESULTS / "README-table-paper-recipe.md",
                    RESULTS / "smollm2-135m-paper-recipe" / "runs", RESULTS / "smollm2-135m-paper-recipe" / "sweep",
                    {"lr": 2e-4, "epochs": 3, "rank": 16, "alpha": 32.0, "dropout": 0.05, "global_batch": 16,
                     "max_len": 256, "val_split": 0.02, "eval_every": EVAL_EVERY},
                    "paper", "results/README-table-paper-recipe.md", "layer-probs-lora-vs-echo-paper-recipe"),
    "1epoch-lr1e-3": Recipe("1epoch-lr1e-3", "1 epoch, lr 1e-3 (picked by a 1-epoch sweep)",
                            RESULTS / "smollm2-135m-commonsense.json", RESULTS / "README-table.md",
                            RESULTS / "smollm2-135m" / "runs", RESULTS / "smollm2-135m" / "recipe-sweep",
                            {"lr": 1e-3, "epochs": 1, "rank": 16, "alpha": 32.0, "global_batch": 16,
                             "micro_batch": 16, "max_len": 256, "val_split": 0.02},
                            "main", "results/README-table.md", "layer-probs-lora-vs-echo"),
}
DEFAULT_RECIPE = "paper"


@dataclass
class Unit:
    """One training run of the queue, and the evaluations it owes."""
    name: str                         # a METHODS key, or "sweep"
    seed: int
    group: str                        # main | ablation | probe | sweep
    evals: tuple = ("greedy",)
    overrides: dict = field(default_factory=dict)      # recipe flags changed (the sweep's epochs / lr)
    folder: str = ""                                    # run folder name (default <name>-s<seed>)

    @property
    def run_name(self):
        return self.folder or f"{self.name}-s{self.seed}"


def sweep_folder(epochs, lr):
    return f"lora-e{epochs:g}-lr{lr:g}"


def extra_opts(extra):
    """train.py flags -> the config.json opts they set (the part of a run's claim beyond the recipe)."""
    out, i = {}, 0
    while i < len(extra):
        key, kind = FLAG_KEYS.get(extra[i], (None, None))
        vals = []
        j = i + 1
        while j < len(extra) and not extra[j].startswith("--"):
            vals.append(extra[j])
            j += 1
        if key is not None:
            if kind is bool:
                out[key] = True
            elif kind is list:
                out[key] = [int(v) if v.lstrip("-").isdigit() else v for v in vals]
            else:
                out[key] = kind(vals[0])
        i = j
    return out


def main_units(methods, seeds, beam=True):
    return [Unit(n, s, "main" if n in MAIN_METHODS else "ablation",
                 ("greedy", "beam4") if (s == 0 and beam) else ("greedy",))
            for s in seeds for n in methods]


def plan(recipe, *, beam=True, extra_ablation_seeds=()):
    """The queue in priority order: seed 0 of the 4 methods, A-1…A-8, the probes, the sweep, seeds 1 and 2,
    then seeds 1-2 of the ablations whose seed-0 Δ exceeded the seed-to-seed sd (extra_ablation_seeds)."""
    if recipe.plan != "paper":
        return main_units(MAIN_METHODS, MAIN_SEEDS, beam)
    units = main_units(MAIN_METHODS, [0], beam)
    units += [Unit(a, 0, "ablation") for a in ABLATIONS]
    units += [Unit(p, 0, "probe", ()) for p in PROBES]
    for epochs, lr in SWEEP_GRID:
        if (epochs, lr) == (recipe.flags["epochs"], recipe.flags["lr"]):
            continue                                    # that point is lora-s0 itself
        units.append(Unit("lora", 0, "sweep", (), {"epochs": epochs, "lr": lr}, sweep_folder(epochs, lr)))
    units += main_units(MAIN_METHODS, [1, 2], beam)
    units += [Unit(a, s, "ablation") for a in extra_ablation_seeds for s in (1, 2)]
    return units


def select(units, only):
    """--only NAME...: a run folder name (lora-s0, A-3-s0, lora-e1-lr0.001), a method or variant (A-3: all
    its seeds), a group (main, ablation, probe, sweep) or seed<N>.
    The units keep the order of the names that picked them (`--only seed1 ablation` queues seed 1 before the
    ablations), and queue order among the units one name picks."""
    if not only:
        return units
    rank = {name: only.index(name) for name in only}                    # a name given twice counts where first
    picked = [(min(rank.get(k, len(only)) for k in (u.run_name, u.name, u.group, f"seed{u.seed}")), i, u)
              for i, u in enumerate(units)]
    return [u for r, _, u in sorted(picked, key=lambda t: t[:2]) if r < len(only)]


def paper_ablations():
    """The paper's Table 4 / 7 rows as recorded in experiments/paper_ablations.json (numbers may be null)."""
    try:
        return json.loads(PAPER_ABLATIONS.read_text())
    except (OSError, ValueError):
        return {"rows": {}}
