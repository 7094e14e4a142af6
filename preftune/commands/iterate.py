"""`preftune iterate`: iterative (online) DPO, rounds of sample -> score -> pair -> train -> evaluate.

    preftune iterate examples/dpo.yaml --model_name_or_path saves/sft --dataset prompts.jsonl \\
        --prompts eval_prompts.jsonl --reward my_rewards.py:score --num_samples 4 --rounds 3 --output_dir saves/iter

Offline DPO trains on pairs sampled once from the SFT model; as the policy drifts from that model, the
pairs describe less and less of what it writes. Each round here samples from the current policy instead
(Xiong et al. 2024, Guo et al. 2024). Round r:

1. sample   num_samples completions per prompt from the current policy (round 1: model_name_or_path),
            scored by `reward` and paired (`pairing`, `min_margin`): `commands.sample.run`
2. train    DPO from the current policy on those pairs, against the SFT model (`round_reference: sft`,
            the default) or the policy the round starts from (`previous`): `train.train`
3. eval     the new policy against the SFT model on `prompts`: reward, win rate, KL per completion:
            `commands.eval.run`

Every other key means what it means to `sample`, `train` and `eval` (one config; num_train_epochs or
max_steps are per round). The prompts of `dataset` are split into `rounds` disjoint parts when each part
holds one optimizer step's prompts, else reused by every round (sampled with seed + r - 1).
Writes into output_dir:

    round_<r>/prompts.jsonl   the prompts the round sampled
    round_<r>/sample/         samples.jsonl, pairs.jsonl, summary.json (preftune sample's)
    round_<r>/model/          the round's policy, preftune_config.yaml, dpo_metrics/ (preftune train's)
    round_<r>/eval/           eval.json, eval.csv, samples.jsonl, frontier.png (preftune eval's, against the SFT model)
    round_<r>/round.json      the phases done and their figures; "done": true once the round is
    summary.json              per round: reward +- stderr, KL to the SFT model, pairs, steps, health signals
    frontier.png              reward against KL to the SFT model, a point per round (the SFT model at KL 0)
    iterate_settings.json     the settings the rounds ran with, which a resumed run must repeat

Run again on the same output_dir, it resumes where it stopped: a finished round or phase is skipped,
sampling continues its samples.jsonl, training its latest checkpoint (save_steps).

Without `reward`, people score: each round samples candidates (round_<r>/sample/samples.jsonl), serves
`preftune label`'s page on them at label_host:label_port, logs that it waits for N labels at its URL,
and trains once every comparison is labelled (or label_min_pairs of them have a preferred completion);
the pairs are the labelled ones (round_<r>/sample/pairs.jsonl, as `label --export` writes them). The
judgements go to samples.jsonl.labels.jsonl as they are given: a rerun keeps them and waits for the rest.
Such rounds are not evaluated (no reward to score the policy's samples), so `prompts` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

from preftune import guard
from preftune.commands import eval as eval_cmd
from preftune.commands import sample as sample_cmd
from preftune.config import load_config, parse_command_line
from preftune.errors import ConfigError, DataError
from preftune.files import write_atomic

log = logging.getLogger("preftune")

USAGE = """usage: preftune iterate [CONFIG.yaml] --model_name_or_path SFT --dataset PROMPTS --prompts EVAL_PROMPTS
                        [--reward module:function|REWARD_MODEL] --output_dir DIR [--rounds 3]
                        [--round_reference sft|previous] [--key value ...]

Iterative DPO: each round samples num_samples completions per prompt from the current policy, scores and
pairs them, trains DPO on the pairs (reference: the SFT model, or the previous round's policy), and
evaluates the new policy against the SFT model on the prompts (reward, KL per completion). Writes
round_<r>/ folders, summary.json and frontier.png; run again on the same output_dir to resume.
Without reward, people label each round's samples on the label page (label_host, label_port; the round
waits until they are labelled, or label_min_pairs) and the rounds are not evaluated (no prompts).
"""

SETTINGS_FILE = "iterate_settings.json"
# Keys that change how a run is watched or where it runs, not what the rounds compute: free on resume
FREE_ON_RESUME = {"label_host", "label_port", "output_dir", "progress_bar", "resume_from_checkpoint", "overwrite_output_dir", "report_to",
                  "run_name", "logging_dir", "hub_token", "preprocessing_num_workers", "dataloader_num_workers",
                  "tokenized_cache_dir", "ref_logps_cache_dir", "overwrite_cache", "plot_loss"}
PATH_KEYS = ("model_name_or_path", "ref_model", "dataset", "prompts", "eval_dataset", "reward")


def settings(cfg) -> dict:
    """What decides the rounds: every key but FREE_ON_RESUME, a local path as an absolute one."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in FREE_ON_RESUME}
    for key in PATH_KEYS:
        value = values.get(key)
        if not isinstance(value, str):
            continue
        module, _, fn = value.rpartition(":")
        if key == "reward" and module.endswith(".py"):  # path/to/file.py:function
            value, fn = module, f":{fn}"
        else:
            fn = ""
        if Path(value).expanduser().exists():
            values[key] = str(Path(value).expanduser().resolve()) + fn
    return values


def check_same_settings(out: Path, cfg) -> None:
    """Refuse to add rounds to an output_dir whose rounds ran with other settings; then record these."""
    path, now = out / SETTINGS_FILE, settings(cfg)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise DataError(f"{path} is not the JSON preftune iterate writes; use another output_dir") from None
        # a key the saved settings lack came with a later preftune: at its default it changes nothing; a saved
        # key this preftune lacks can no longer be set
        defaults = settings(type(cfg)())
        changed = sorted(k for k in now if saved.get(k, defaults.get(k)) != now[k])
        if changed:
            raise ConfigError(f"output_dir: {out} holds rounds run with other settings ("
                              + ", ".join(f"{k} {saved.get(k, defaults.get(k))!r} -> {now[k]!r}" for k in changed[:4])
                              + (", ..." if len(changed) > 4 else "") + "); resume with the earlier values, or use "
                              "another output_dir")
    elif any(out.glob("round_*")):
        raise ConfigError(f"output_dir: {out} holds round_* folders that preftune iterate did not write (no "
                          f"{SETTINGS_FILE}); use another output_dir")
    write_atomic(path, json.dumps(now, indent=1, default=str))


def split_prompts(n: int, cfg) -> tuple[list[list[int]], bool]:
    """The prompt positions each round samples, and whether the parts are disjoint: `rounds` seeded, disjoint
    parts when each holds at least one optimizer step's prompts (best_worst pairs one pair per prompt at
    most), else all of them every round."""
    step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if cfg.rounds > 1 and n // cfg.rounds >= step:
        order = list(range(n))
        random.Random(cfg.seed).shuffle(order)
        return [sorted(order[r * n // cfg.rounds:(r + 1) * n // cfg.rounds]) for r in range(cfg.rounds)], True
    return [list(range(n))] * cfg.rounds, False


def run(cfg) -> dict:
    """The rounds into cfg.output_dir (checked apart from the models, writable, locked); returns the summary."""
    if not cfg.model_name_or_path or not cfg.dataset:
        raise ConfigError("preftune iterate needs model_name_or_path (the SFT model the rounds start from) and "
                          "dataset (the prompts to sample)")
    if cfg.reward and not cfg.prompts:
        raise ConfigError("preftune iterate needs prompts: held-out prompts each round's policy is evaluated on "
                          "(reward and KL to the SFT model); keep them apart from dataset")
    if not cfg.reward and cfg.prompts:
        raise ConfigError("prompts: without reward people score the rounds on the label page, and nothing scores "
                          "the evaluation's samples; unset prompts (the rounds then skip their evaluation) or set "
                          "reward")
    if not cfg.reward:  # people label: the page must be servable before a round samples for it
        import importlib.util

        if not (importlib.util.find_spec("fastapi") and importlib.util.find_spec("uvicorn")):
            from preftune.commands.label import LABEL_INSTALL
            raise ConfigError(LABEL_INSTALL.replace("preftune label needs", "preftune iterate without reward needs")
                              ) from None
    if cfg.num_samples < 2:
        raise ConfigError(f"num_samples: each round pairs completions of a prompt, so it needs at least 2; got "
                          f"{cfg.num_samples}")
    if cfg.stage != "dpo":
        raise ConfigError(f"stage: preftune iterate trains DPO (stage: dpo) each round; got {cfg.stage}")
    guard.check_inputs(cfg)
    with guard.claim_output_dir(cfg.output_dir, guard.model_inputs(cfg)) as out:
        return _iterate(cfg, out)


def _iterate(cfg, out: Path) -> dict:
    from preftune.data import read_prompts

    check_same_settings(out, cfg)
    prompts = read_prompts(cfg.dataset, cfg.dataset_dir, cfg.max_samples, cfg.columns)
    parts, fresh = split_prompts(len(prompts), cfg)
    # the SFT model: the rounds' start, the evaluation's reference, and the training's with round_reference: sft
    sft = cfg.ref_model or cfg.model_name_or_path
    policy, rounds = cfg.model_name_or_path, []
    prompt_note = {"total": len(prompts), "per_round": [len(p) for p in parts], "fresh": fresh,
                   "why": f"{'disjoint parts' if fresh else 'every round samples all of them'}: "
                          f"{len(prompts)} prompts, {cfg.rounds} rounds, "
                          f"{cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps} per optimizer step"}
    for r in range(1, cfg.rounds + 1):
        rec = run_round(cfg, r, out / f"round_{r}", [prompts[i] for i in parts[r - 1]], policy, sft)
        rounds.append(rec)
        policy = rec["model"]
        summary = write_summary(out, cfg, rounds, prompt_note, sft)
    return summary


def run_round(cfg, r: int, folder: Path, prompts: list, policy: str, sft: str) -> dict:
    """Round r's phases, each skipped when round.json says it is done (a resumed run); returns its record."""
    from preftune.checkpoints import checkpoint_folders, missing
    from preftune.train import train

    state_path = folder / "round.json"
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {"round": r, "done": False}
    if state["done"]:
        log.info("round %d: done before (%s), skipped", r, state_path)
        return state
    folder.mkdir(parents=True, exist_ok=True)
    reference = sft if cfg.round_reference == "sft" else policy
    state.update({"model": str(folder / "model"), "started_from": policy, "reference": reference})

    def save():
        write_atomic(state_path, json.dumps(state, indent=1, default=str))

    if "sample" not in state:
        prompts_file = folder / "prompts.jsonl"
        write_atomic(prompts_file, "".join(json.dumps({k: v for k, v in sample_cmd.prompt_record(p).items()
                                                       if v is not None}, ensure_ascii=False) + "\n" for p in prompts))
        log.info("round %d/%d: sampling %d prompts from %s", r, cfg.rounds, len(prompts), policy)
        # sampled with seed + r - 1: rounds that reuse the prompts draw new completions even from equal weights
        sampled = sample_cmd.run(dataclasses.replace(
            cfg, model_name_or_path=policy, dataset=str(prompts_file), columns=None, max_samples=None,
            seed=cfg.seed + r - 1, output_dir=str(folder / "sample")))
        if not cfg.reward:  # candidates for people: the label phase pairs them
            state["sample"] = {"prompts": sampled["prompts"], "pairs": None, "reward_mean": None,
                               "candidates": sampled["outputs"]["samples"]}
        elif not sampled["pairs"]:
            raise DataError(f"round {r}: the samples of {prompts_file} made no pair ({sampled['skipped']}); raise "
                            "num_samples or temperature, or lower min_margin")
        else:
            state["sample"] = {"prompts": sampled["prompts"], "pairs": sampled["pairs"], "skipped": sampled["skipped"],
                               "reward_mean": sampled["reward"]["mean"], "pairs_file": sampled["outputs"]["pairs"]}
        save()

    if not cfg.reward and "label" not in state:
        state["label"] = wait_for_labels(cfg, r, Path(state["sample"]["candidates"]), folder / "sample" / "pairs.jsonl")
        state["sample"].update(pairs=state["label"]["pairs"], pairs_file=state["label"]["pairs_file"])
        save()

    if "train" not in state:
        model_dir = folder / "model"
        complete = [p for _, p in checkpoint_folders(model_dir) if not missing(p)] if model_dir.is_dir() else []
        log.info("round %d/%d: DPO from %s against %s%s", r, cfg.rounds, policy, reference,
                 f" (resuming {complete[-1].name})" if complete else "")
        summary = train(dataclasses.replace(
            cfg, model_name_or_path=policy, dataset=state["sample"]["pairs_file"], columns=None, max_samples=None,
            # unset in round 1: train's own default, a frozen copy of the starting policy (the SFT model)
            ref_model=None if reference == policy and not cfg.ref_model else reference,
            output_dir=str(model_dir), resume_from_checkpoint="true" if complete else None))
        if not summary:
            raise ConfigError("preftune iterate runs in one process; start it without torchrun or accelerate launch")
        base, final = summary.get("baseline") or {}, summary["final"]
        state["train"] = {"steps": summary["steps"]["done"], "kept_model": summary["kept_model"],
                          "heldout_accuracy": [base.get("eval_rewards/accuracies"),
                                               final.get("eval_rewards/accuracies")],
                          "health": [{k: s[k] for k in ("name", "value", "threshold", "unit", "step", "remedy")}
                                     for s in summary["health"] if s["fired"]]}
        save()

    if "eval" not in state and not cfg.reward:
        log.info("round %d/%d: no evaluation (scored by people: no reward to score the policy's samples)", r, cfg.rounds)
        state["eval"] = state["sft"] = None
    if "eval" not in state:
        log.info("round %d/%d: evaluating against %s on %s", r, cfg.rounds, sft, cfg.prompts)
        report = eval_cmd.run(dataclasses.replace(cfg, model_name_or_path=state["model"], ref_model=sft, dataset=None,
                                                  output_dir=str(folder / "eval")))
        p = report["models"][0]["prompts"]
        state["eval"] = {k: p[k] for k in ("reward", "reward_stderr", "kl_per_sequence", "kl_per_sequence_stderr",
                                           "win_rate_vs_reference", "mean_length", "samples")}
        state["sft"] = {k: report["reference"][k] for k in ("reward", "reward_stderr", "mean_length", "samples")}
    state["done"] = True
    save()
    return state


def enough_labels(progress: dict, min_pairs: int) -> bool:
    """Every comparison judged, or (label_min_pairs > 0) that many with a preferred completion."""
    return progress["unlabelled"] == 0 or 0 < min_pairs <= progress["preferred"]


def wait_for_labels(cfg, r: int, candidates: Path, pairs_file: Path) -> dict:
    """Serve the label page (preftune label's app) on round r's candidates until enough_labels, then write
    the labelled pairs to pairs_file. The judgements go to candidates' labels file as they are given, so a
    rerun keeps them and waits for the rest; Ctrl+C stops the run (exit 130) with them kept."""
    import threading

    import uvicorn

    from preftune.commands.label import LOOPBACK, create_app, listen, own_names
    from preftune.labels import LabelStore, dataset_folders, export_pairs

    store = LabelStore(candidates, cfg.seed, writable=True, image_roots=dataset_folders(cfg))  # the prompts' images
    try:
        p = store.progress()
        need = p["total"] if cfg.label_min_pairs == 0 else cfg.label_min_pairs
        if not enough_labels(p, cfg.label_min_pairs):
            lock = threading.Lock()  # the app's, held while the watcher reads the store
            server = uvicorn.Server(uvicorn.Config(create_app(store, None, own_names(cfg.label_host), lock),
                                                   log_level="warning"))
            sock = listen(cfg.label_host, cfg.label_port)
            host = f"[{cfg.label_host}]" if ":" in cfg.label_host else cfg.label_host
            url = f"http://{host}:{sock.getsockname()[1]}/"
            what = ("labels (every comparison)" if cfg.label_min_pairs == 0
                    else "labels with a preferred completion")
            log.warning("round %d/%d: waiting for %d %s at %s (%d of %d comparisons labelled; judgements go to %s)",
                        r, cfg.rounds, need, what, url, p["labelled"], p["total"], store.labels_path)
            if cfg.label_host not in LOOPBACK:
                log.warning("serving on %s: the page has no login, so anyone who can reach it can label",
                            cfg.label_host)
            stop = threading.Event()

            def watch():
                while not stop.wait(0.2):
                    with lock:
                        if enough_labels(store.progress(), cfg.label_min_pairs):
                            server.should_exit = True
                            return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                server.run(sockets=[sock])
            finally:
                stop.set()
                watcher.join()
                sock.close()
            if not enough_labels(store.progress(), cfg.label_min_pairs):  # Ctrl+C: uvicorn stopped, labels kept
                raise KeyboardInterrupt
        counts = export_pairs(store, pairs_file)
    finally:
        store.close()
    log.info("round %d/%d: %d pairs from %d labelled comparisons (%d tied, %d skipped)", r, cfg.rounds,
             counts["pairs"], counts["labelled"], counts["ties"], counts["skips"])
    if not counts["pairs"]:
        raise DataError(f"round {r}: the labels of {candidates} made no pair (every judgement a tie or skip); "
                        f"undo some on the page, or move {store.labels_path.name} away to label again")
    return {"pairs": counts["pairs"], "pairs_file": str(pairs_file), "labels": str(store.labels_path),
            **{k: counts[k] for k in ("total", "labelled", "preferred", "ties", "skips", "unlabelled")}}


def write_summary(out: Path, cfg, rounds: list[dict], prompt_note: dict, sft: str) -> dict:
    """summary.json and frontier.png from the rounds done so far."""
    # a round scored by people has no evaluation (eval: null): its figures are null, and no frontier is drawn
    rows = [{"round": s["round"], **{name: (s["eval"] or {}).get(key) for name, key in (
                ("reward", "reward"), ("reward_stderr", "reward_stderr"), ("kl_to_sft", "kl_per_sequence"),
                ("kl_to_sft_stderr", "kl_per_sequence_stderr"), ("win_rate_vs_sft", "win_rate_vs_reference"),
                ("mean_length", "mean_length"))},
             "scored_by": "people (label page)" if "label" in s else "reward",
             "labels": s.get("label"), "pairs": s["sample"]["pairs"], "sample_reward_mean": s["sample"]["reward_mean"],
             "steps": s["train"]["steps"], "reference": s["reference"], "model": s["model"],
             "health": s["train"]["health"]} for s in rounds]
    summary = {"status": "completed" if len(rounds) == cfg.rounds else "running", "rounds_planned": cfg.rounds,
               "round_reference": cfg.round_reference, "sft_model": sft, "sft": rounds[-1]["sft"],
               "prompts": prompt_note, "eval_prompts": cfg.prompts, "rounds": rows,
               "kl_unit": "nats per completion, on the policy's own samples of the eval prompts",
               "outputs": {"summary": str(out / "summary.json"), "frontier": str(out / "frontier.png")}}
    if summary["sft"] is None:
        summary["outputs"]["frontier"] = None
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
    if summary["sft"] is None:
        return summary
    eval_cmd.plot_frontier([{"model": f"round {row['round']}",
                             "prompts": {"reward": row["reward"], "reward_stderr": row["reward_stderr"],
                                         "kl_per_sequence": row["kl_to_sft"],
                                         "kl_per_sequence_stderr": row["kl_to_sft_stderr"]}} for row in rows],
                           summary["sft"], out / "frontier.png")
    return summary


def main(args: list[str]) -> int:
    config_path, overrides, _ = parse_command_line(args)
    summary = run(load_config(config_path, overrides))
    s = summary["sft"]
    print(f"prompts: {summary['prompts']['why']}")
    print("  round  pairs  steps  reward            KL to SFT (nats/completion)  health")
    if s is not None:
        print(f"  SFT                  {s['reward']:+.3f} +- {s['reward_stderr']:.3f}")
    for row in summary["rounds"]:
        fired = ", ".join(f"{h['name']} at step {h['step']}" for h in row["health"]) or "-"
        figures = (f"{row['reward']:+.3f} +- {row['reward_stderr']:.3f}  {row['kl_to_sft']:.3f} +- "
                   f"{row['kl_to_sft_stderr']:.3f}{'':17s}" if row["reward"] is not None
                   else f"{'not evaluated (labelled by people)':<54s}")
        print(f"  {row['round']:<5d}  {row['pairs']:<5d}  {row['steps']:<5d}  {figures}{fired}")
    written = [summary["outputs"]["summary"], *([summary["outputs"]["frontier"]] if s is not None else [])]
    print(f"written: {', '.join(written)}, round_<r>/")
    return 0
