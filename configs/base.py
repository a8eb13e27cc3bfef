"""Every field of a run configuration, with its meaning (docs/FORMULAS.md §3–§9, §R5–§R8).

Use a model/dataset config (e.g. ``configs/smollm2_cf.py``) and override fields on the command line::

    python launch/edit.py --config=configs/smollm2_cf.py --config.batch_size=10 --config.method=metake

Fields that are "unset" by default are ml_collections placeholders (overridable with a value).
"""
from __future__ import annotations

from pathlib import Path

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from metake_jax import editors
from metake_jax.methods import methods

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # benchmark data lives beside the repo, never inside it

METHODS = methods()  # every editor of the registry, metake_<gated editor>, metake and its ablations


def data_path(relative: str) -> str:
    """``<repo>/../shared/data/<relative>`` (the file may be absent; the runner then says so)."""
    return str(SHARED_DATA / relative)


def editor_sections() -> ConfigDict:
    """``editor.<name>`` for every registered editor, from the editor classes' defaults (one source)."""
    c = ConfigDict()
    for name, fields in editors.default_config().items():
        c[name] = ConfigDict({k: placeholder(tuple) if k == "layers" and v is None else v for k, v in fields.items()})
    return c


def get_config() -> ConfigDict:
    c = ConfigDict()

    # ---------------------------------------------------------------- model
    # Model spec: "smollm2" (embedded SmolLM2-135M-Instruct) | path to a .gguf file | a converted
    # (orbax) directory | an HF checkpoint directory | a hub id "org/name" (needs network) |
    # "random:<family>[:<size>]" (random weights + built-in tokenizer; family gpt2|gptj|llama|qwen3).
    c.model = "smollm2"
    c.dtype = "float32"  # float32 | bfloat16 (param/compute dtype)
    c.remat = False  # jax.checkpoint each block in backward passes (ModelConfig.remat): on for 6-8B models
    c.model_id = placeholder(str)  # id used in the statistics cache key (default: derived from model)

    # ---------------------------------------------------------------- requests
    c.data = ConfigDict()
    c.data.path = "demo"  # "demo" = bundled metake_jax/data/demo_counterfact.json, else a JSON file
    c.data.format = "auto"  # auto | rome | flat | zsre (metake_jax.data.loaders)
    c.data.n = placeholder(int)  # number of cases (unset = all)
    c.data.seed = placeholder(int)  # unset = first n in file order; else a seeded random n (file order kept)
    c.data.chat = False  # wrap rewrite / paraphrase / neighborhood prompts in the tokenizer's chat template (instruct models)

    # ---------------------------------------------------------------- method (docs/FORMULAS.md §4, §6)
    c.method = "alphaedit"  # one of METHODS
    c.batch_size = 100  # requests per sequential batch (docs/FORMULAS.md §9)
    c.layers = (4, 5, 6, 7, 8)  # edited layers (increasing)

    # Stage I (docs/FORMULAS.md §3; reference v_lr, v_num_grad_steps, clamp_norm_factor, kl_factor, v_weight_decay)
    c.stage1 = ConfigDict()
    c.stage1.lr = 0.5
    c.stage1.steps = 25
    c.stage1.clamp_norm_factor = 0.75
    c.stage1.kl_factor = 0.0625
    c.stage1.weight_decay = 0.5
    c.stage1.early_stop = 5e-2  # stop a request's optimization once its NLL < this
    c.stage1.row_groups = 4  # rows run in 4 length-sorted groups at their own widths (same numbers, less padding)

    # Downstream editors (docs/FORMULAS.md §4; §R5): one section per registered editor, editor.<name>.<field>,
    # with the editor's defaults (metake_jax/editors/<name>.py documents each field), e.g.
    #   editor.alphaedit.l2 = 10 (λ of P(KKᵀ+C_p) + λI); editor.memit.mom2_update_weight = 15000 (λ_C);
    #   editor.<name>.solve_dtype (float64 for MEMIT, float32 for AlphaEdit, as the references);
    #   editor.<name>.layers: that editor's own edited layers (unset: the run's `layers`).
    c.editor = editor_sections()
    c.editor.nullspace_threshold = 2e-2  # projector P: absolute eigenvalue threshold on C0 = E[kkᵀ]
    c.editor.energy = placeholder(float)  # optional: keep the null space holding this energy fraction instead

    # MetaKE refinement (docs/FORMULAS.md §6); used by the metake* methods
    c.metake = ConfigDict()
    c.metake.steps = 15  # T outer steps
    c.metake.lr = 3e-3  # η, in residual units with anchor=relative (tuned on SmolLM2, bench/RESULTS.md)
    c.metake.gate = "structural"  # structural | keyonly (set by method=metake_keyonly)
    c.metake.feedback = "gated"  # gated | stopgrad | ungated (set by method=metake_stopgrad / metake_ungated)
    c.metake.anchor = "relative"  # relative: ‖z−z⁰‖²/‖r⁰‖², steps in residual units (scale-invariant) | absolute: literal
    c.metake.line_search = "batch"  # Armijo: batch (Σ ℓ_meta never rises) | request (no request's ℓ_meta rises) | none
    c.metake.max_halvings = 8
    c.metake.weights = ConfigDict(dict(edit=1.0, loc=1.0, anchor=1.0))  # a = weights.anchor: the trade-off knob
    c.metake.prompts = "all"  # all | bare: rows scoring the virtual model (bare + KL prompt: ~3.5x cheaper)

    # ---------------------------------------------------------------- layer statistics C0 (docs/FORMULAS.md §R3)
    c.stats = ConfigDict()
    c.stats.kind = "datasets"  # datasets | files | model (texts sampled from the model itself; offline)
    c.stats.name = "wikipedia"  # HF dataset (kind=datasets)
    c.stats.config = "20200501.en"
    c.stats.split = "train"
    c.stats.paths = ()  # .txt / .jsonl files (kind=files)
    c.stats.n_samples = 100000
    c.stats.max_len = 512
    c.stats.token_budget = 8192  # tokens per statistics forward batch
    c.stats.precision = "highest"  # Σ k kᵀ matmul: highest (float32, reference) | high | default (TF32/bf16 on GPU)
    c.stats.seed = 1
    c.stats.cache_dir = ""  # "" = $METAKE_CACHE/stats (default ~/.cache/metake-jax/stats)

    # ---------------------------------------------------------------- evaluation (docs/FORMULAS.md §8; §R7–§R8)
    c.eval = ConfigDict()
    c.eval.pre = True  # evaluate all cases on the unedited model (pre/post table)
    c.eval.final = True  # evaluate all cases on the final model
    c.eval.batch = True  # after each batch, efficacy on that batch's cases (cheap; plotted vs edits)
    c.eval.batch_size = 32  # scoring batch size
    c.eval.fluency = False  # CounterFact fluency (n-gram entropy of generations)
    c.eval.fluency_cases = 0  # generations for the first N cases only (0 = all cases)
    c.eval.max_out_len = 100
    c.eval.reference_stats = ""  # dir with attribute_snippets.json / idf.npy / tfidf_vocab.json (consistency)
    c.eval.glue_dir = data_path("glue_eval")  # skipped when the directory is absent
    c.eval.glue_tasks = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
    c.eval.glue_n = 100  # examples per task
    c.eval.glue_every = 5  # GLUE on the base model and after every k batches (0 = base and final only, -1 = never)
    c.eval.glue_generation = True  # also the generation-based F1 (slower)

    # ---------------------------------------------------------------- context templates (docs/FORMULAS.md §2)
    c.templates = ConfigDict()
    c.templates.seed = 0
    c.templates.file = ""  # JSON [["{}"], [...]] to use instead of sampling
    c.templates.n_per_prompt = 1  # samples per seed word (5 seed words)
    c.templates.length = 10  # tokens per sampled template

    # ---------------------------------------------------------------- run
    c.run_dir = "runs/default"
    c.resume = False  # continue from run_dir/checkpoints (same weights as an uninterrupted run)
    c.keep_checkpoints = 2
    c.export_hf = ""  # if set, write the edited model there as an HF checkpoint
    c.seed = 0  # run RNG (random models, generations)
    c.progress = True  # tqdm progress bars
    return c


def reference(*, model: str, layers: tuple[int, ...], lr: float, steps: int, max_len: int,
              mom2_update_weight: float) -> ConfigDict:
    """A paper-model config with the reference hyper-parameters (docs/FORMULAS.md §R6: AE hparams
    AlphaEdit + MEMIT; clamp 0.75, KL 0.0625, wd 0.5, L2 10, threshold 2e-2, 100k Wikipedia docs)."""
    c = get_config()
    c.model = model
    c.layers = tuple(layers)
    c.stage1.lr = lr  # v_lr
    c.stage1.steps = steps  # v_num_grad_steps
    c.stage1.clamp_norm_factor = 0.75
    c.stage1.kl_factor = 0.0625
    c.stage1.weight_decay = 0.5  # v_weight_decay
    c.editor.alphaedit.l2 = 10.0  # AlphaEdit L2
    c.editor.nullspace_threshold = 2e-2
    c.editor.memit.mom2_update_weight = mom2_update_weight  # MEMIT λ_C
    c.stats.kind = "datasets"  # wikipedia 20200501.en, 100k docs, seed 1 (docs/FORMULAS.md §R3)
    c.stats.n_samples = 100000
    c.stats.max_len = max_len  # n_positions / max_position_embeddings
    c.batch_size = 100  # sequential batches of 100 (docs/FORMULAS.md §9)
    c.remat = True  # GPT-J at batch 100: Stage I needs 127 GiB without it (bench/RESULTS.md, GPU)
    c.eval.glue_every = 5
    return c


def _dataset(c: ConfigDict, name: str, path: str, fmt: str, n: int) -> ConfigDict:
    c.data.path = data_path(path)
    c.data.format = fmt
    c.data.n = n
    c.run_dir = f"runs/{name}"
    return c


def counterfact(c: ConfigDict, name: str) -> ConfigDict:
    """2000 CounterFact edits (flat split in ../shared/data) in batches of 100."""
    return _dataset(c, name, "counterfact_easyedit/counterfact-edit.json", "flat", 2000)


def zsre(c: ConfigDict, name: str) -> ConfigDict:
    """ZsRE (MEND format; the 1k file in ../shared/data, or the 19k eval file via --config.data.path)."""
    return _dataset(c, name, "zsre_mend_train_1k.json", "zsre", 1000)
