"""Gradual magnitude pruning: schedule, exact zero counts, LSTM forward, resume, config round trip, export."""

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelPruning
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

from lm_lightning.callbacks.export import Export
from lm_lightning.callbacks.pruning import MagnitudePruning
from lm_lightning.cli import build_cli, main
from lm_lightning.errors import LMInputError
from lm_lightning.export.writer import export_network
from lm_lightning.networks import LSTMNetwork
from lm_lightning.networks.weights import prunable_weights
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
PRUNING = "lm_lightning.callbacks.pruning.MagnitudePruning"
EXACT = {"rtol": 0.0, "atol": 0.0}
LSTM_WEIGHTS = [f"lstm.weight_{kind}_l{k}" for k in range(2) for kind in ("ih", "hh")]




def base_args(corpus: Path) -> list[str]:
    return [
        "--data.source", str(corpus), "--data.min_freq", "1", "--data.batch_size", "8", "--data.eval_batch_size", "4",
        "--data.bptt", "7", "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.network.num_layers", "2",
        "--model.network.dropout", "0", "--model.sample_length", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "3", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def fit(workdir: Path, args: list[str]):
    """Run ``fit`` in ``workdir``; the CLI comes back with ``run``, its absolute log folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    try:
        os.chdir(workdir)
        cli = build_cli(["fit", *args])
    finally:
        os.chdir(cwd)
    cli.run = workdir / cli.trainer.log_dir
    return cli


def pruning_args(**init_args) -> list[str]:
    args = [f"--trainer.callbacks+={PRUNING}", "--export.enabled", "false"]
    for key, value in init_args.items():
        args += [f"--trainer.callbacks.{key}", str(value)]
    return args


def callback(cli) -> MagnitudePruning:
    return next(c for c in cli.trainer.callbacks if isinstance(c, MagnitudePruning))


def zeros(network) -> dict[str, torch.Tensor]:
    """Zero pattern of every prunable weight of a plain (unhooked) network."""
    return {name: getattr(m, a).detach() == 0 for name, (m, a) in prunable_weights(network)[0].items()}


class MaskProbe(L.Callback):
    """Records the pruning masks on the network when training starts (after a resume has restored them)."""

    def on_train_start(self, trainer, pl_module):
        net = pl_module.network
        self.masks = {n: getattr(m, f"{a}_mask").bool() for n, (m, a) in prunable_weights(net)[0].items() if hasattr(m, f"{a}_mask")}


def set_up(model: LanguageModel, **kwargs) -> MagnitudePruning:
    """The callback driven by hand, without a Trainer."""
    cb = MagnitudePruning(**kwargs)
    cb.setup(SimpleNamespace(max_epochs=5), model, "fit")
    return cb


# --- schedule and arguments ------------------------------------------------------------------------------
def test_schedules_at_given_epochs():
    def values(schedule):
        cb = MagnitudePruning(sparsity=0.8, schedule=schedule, start_epoch=1, end_epoch=4)
        return [cb.sparsity_at(epoch) for epoch in range(7)]

    assert values("constant") == [0.0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    assert values("linear") == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8], abs=1e-12)
    # Zhu & Gupta: s_f * (1 - (1 - k/n)^3), n = 4 steps
    assert values("cubic") == pytest.approx([0.0, 0.4625, 0.7, 0.7875, 0.8, 0.8, 0.8], abs=1e-12)
    # Defaults: one dense epoch, the target reached at the last epoch (a one-epoch run prunes at its start).
    assert MagnitudePruning().resolve_epochs(15) == (1, 14)
    assert MagnitudePruning().resolve_epochs(1) == (0, 0)
    assert MagnitudePruning(start_epoch=0).resolve_epochs(3) == (0, 2)


@pytest.mark.parametrize(
    "step, kwargs, message",
    [
        (MagnitudePruning, {"sparsity": 1.0}, "sparsity must be a fraction in [0, 1)"),
        (MagnitudePruning, {"sparsity": -0.1}, "sparsity must be a fraction in [0, 1)"),
        (MagnitudePruning, {"schedule": "exponential"}, "schedule must be one of constant, linear, cubic"),
        (MagnitudePruning, {"scope": "local"}, "scope must be 'global' or 'layer'"),
        (MagnitudePruning, {"start_epoch": -1}, "start_epoch and end_epoch must be >= 0"),
        (MagnitudePruning, {"start_epoch": 3, "end_epoch": 2}, "end_epoch (2) comes before start_epoch (3)"),
        (Export, {"bits": 16}, "bits must be 8"),  # the export's bits (--export.bits) are the export step's now
    ],
)
def test_bad_arguments_at_construction(step, kwargs, message):
    with pytest.raises(LMInputError) as error:
        step(**kwargs)
    assert message in str(error.value) and str(error.value).count("\n") == 0


@pytest.mark.parametrize(
    "init_args, export_args, message",
    [
        ({"end_epoch": 3}, [], "end_epoch (3) must be below max_epochs (3)"),
        ({"start_epoch": 3}, [], "start_epoch (3) must be below max_epochs (3)"),
        ({"parameters": "[lstm.weight_xx_l0]"}, [], "parameters ['lstm.weight_xx_l0'] are not weights of the network"),
        ({}, ["--export.enabled", "true", "--export.bits", "4", "--export.group_size", "5"], "group_size 5 does not divide the input width 16"),
    ],
    ids=["end-after-max-epochs", "start-after-max-epochs", "unknown-weight", "export-group-size"],
)
def test_bad_arguments_fail_at_start_up_with_one_sentence(tiny_corpus, tmp_path, monkeypatch, capsys, init_args, export_args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base_args(tiny_corpus), "--trainer.max_epochs", "3", *pruning_args(**init_args), *export_args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err, err
    assert not list(tmp_path.rglob("*.ckpt"))  # failed before any training step


# --- what is pruned, and that the LSTM really computes with the pruned weights ----------------------------
def test_lstm_weights_are_named_and_a_tied_matrix_is_pruned_once():
    tied = LSTMNetwork(30, 16, 16, num_layers=2, tie_weights=True)
    targets, mirrors = prunable_weights(tied)
    assert sorted(targets) == sorted(["embedding.weight", *LSTM_WEIGHTS])
    assert mirrors == {"decoder.weight": (tied.decoder, "weight", "embedding.weight")}
    untied = LSTMNetwork(30, 16, 16, num_layers=2, tie_weights=False)
    assert sorted(prunable_weights(untied)[0]) == sorted(["embedding.weight", "decoder.weight", *LSTM_WEIGHTS])
    # The trap this avoids: ModelPruning's own discovery skips nn.LSTM and lists the tied matrix twice.
    default = ModelPruning.sanitize_parameters_to_prune(LanguageModel(LSTMNetwork(30, 16, 16, 2)), (), ["weight"])
    assert [type(m).__name__ for m, _ in default] == ["Embedding", "Linear"]


def zeroed_by_hand(model: LanguageModel) -> LSTMNetwork:
    """A plain network whose weights are ``orig * mask`` of the pruned one, copied in by hand."""
    net = model.network
    plain = LSTMNetwork(net.vocab_size, 16, 16, 2, 0.0, True)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            module_name, attr = name.rsplit(".", 1)
            source = net.get_submodule(module_name)
            value = getattr(source, f"{attr}_orig") if hasattr(source, f"{attr}_orig") else getattr(source, attr)
            mask = getattr(source, f"{attr}_mask", torch.ones_like(value))
            param.copy_(value * mask)
    return plain.eval()


# Global over the LSTM matrices only: at initialization the embedding (U(-0.1, 0.1)) is smaller than the LSTM
# (U(-0.25, 0.25)), so one global threshold over both would zero the whole embedding first.
@pytest.mark.parametrize("scope, parameters", [("layer", None), ("global", LSTM_WEIGHTS)])
def test_pruned_lstm_computes_with_zeros_before_and_after_an_optimizer_step(scope, parameters):
    torch.manual_seed(0)
    model = LanguageModel(LSTMNetwork(30, embedding_dim=16, hidden_dim=16, num_layers=2, dropout=0.0)).eval()
    ids = torch.randint(0, 30, (3, 7))
    dense = model(ids)[0].detach()
    cb = set_up(model, scope=scope, parameters=parameters)
    assert sorted(cb._targets) == sorted(parameters or ["embedding.weight", *LSTM_WEIGHTS])
    cb.apply_pruning(0.5)
    net = model.network
    total = sum(getattr(m, f"{a}_mask").numel() for m, a in cb._targets.values())
    pruned = {n: int((getattr(m, f"{a}_mask") == 0).sum()) for n, (m, a) in cb._targets.items()}
    if scope == "layer":
        assert pruned == {n: round(0.5 * getattr(m, a).numel()) for n, (m, a) in cb._targets.items()}
    assert sum(pruned.values()) == round(0.5 * total)
    if parameters is None:  # the tied decoder shares the embedding's mask: one matrix, pruned once
        assert net.decoder.weight_mask is net.embedding.weight_mask
    else:
        assert not hasattr(net.decoder, "weight_mask") and not hasattr(net.embedding, "weight_mask")

    logits = model(ids)[0]
    assert_close(logits, zeroed_by_hand(model)(ids)[0], **EXACT)
    assert (logits - dense).abs().max() > 1e-3  # pruning changed the output: the comparison above means something

    # One optimizer step moves the kept weights; the forward pre-hook refreshes nn.LSTM._flat_weights from them.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = net.lstm.weight_hh_l1_orig.detach().clone()
    torch.nn.functional.cross_entropy(logits.reshape(-1, 30), ids.reshape(-1)).backward()
    optimizer.step()
    mask = net.lstm.weight_hh_l1_mask.bool()
    assert (net.lstm.weight_hh_l1_orig.grad[~mask] == 0).all()  # no gradient reaches a pruned weight
    assert not torch.equal(net.lstm.weight_hh_l1_orig[mask], before[mask])
    logits = model(ids)[0]
    assert_close(logits, zeroed_by_hand(model)(ids)[0], **EXACT)
    assert net.lstm._flat_weights[net.lstm._flat_weights_names.index("weight_hh_l1")] is net.lstm.weight_hh_l1
    assert int((net.lstm.weight_hh_l1 == 0).sum()) >= int((~mask).sum())

    # torch leaves `orig * mask` with its autograd history on the module, which deepcopy refuses; the callback
    # detaches it after every training batch.
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    cb.on_train_batch_end(None, model, None, None, 0)
    assert_close(copy.deepcopy(model)(ids)[0], logits, **EXACT)


# --- training with the Trainer ----------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_fit_reaches_the_target_sparsity_logs_it_and_checkpoints_weights_and_masks(tiny_corpus, tmp_path, scope):
    # Global over the LSTM only (see above: the small embedding would go first); per layer over every matrix.
    names = LSTM_WEIGHTS if scope == "global" else ["embedding.weight", *LSTM_WEIGHTS]
    init_args = {"sparsity": 0.75, "scope": scope, "start_epoch": 0, "end_epoch": 1, "parameters": f"[{','.join(names)}]"}
    cli = fit(tmp_path, [*base_args(tiny_corpus), "--trainer.max_epochs", "3", *pruning_args(**init_args)])
    net = cli.model.network
    assert not [k for k in net.state_dict() if k.endswith(("_orig", "_mask"))]  # plain weights after fit
    assert net.decoder.weight is net.embedding.weight  # still tied
    counts = {n: (int(z.sum()), z.numel()) for n, z in zeros(net).items() if n in names}
    assert not zeros(net)["embedding.weight"].any() or scope == "layer"
    assert sum(z for z, _ in counts.values()) == round(0.75 * sum(n for _, n in counts.values()))
    if scope == "layer":
        assert all(z == round(0.75 * n) for z, n in counts.values()), counts
    else:  # one global threshold: tensors end up with different sparsity
        assert max(abs(z / n - 0.75) for z, n in counts.values()) > 0.01, counts

    events = EventAccumulator(str(cli.run))
    events.Reload()
    overall = [e.value for e in events.Scalars("pruning/sparsity")]
    assert overall == pytest.approx([0.75 * (1 - 0.5**3), 0.75, 0.75], abs=2e-3)  # cubic, 2 steps, then held
    per_tensor = [e.value for e in events.Scalars("pruning/sparsity/lstm.weight_hh_l1")]
    assert len(per_tensor) == 3 and per_tensor[-1] == pytest.approx(counts["lstm.weight_hh_l1"][0] / 1024)

    checkpoint = torch.load(cli.run / "checkpoints/last.ckpt", weights_only=False)
    state, masks = checkpoint["state_dict"], checkpoint["callbacks"]["MagnitudePruning"]["masks"]
    assert sorted(masks) == sorted(counts)
    for name, mask in masks.items():
        assert torch.equal(state[f"network.{name}"] == 0, ~mask)  # zeros exactly where the mask says
    assert torch.equal(state["network.decoder.weight"], state["network.embedding.weight"])
    plain = LanguageModel.load_from_checkpoint(cli.run / "checkpoints/last.ckpt")  # no callback needed to load it
    assert {n: int(z.sum()) for n, z in zeros(plain.network).items() if n in names} == {n: z for n, (z, _) in counts.items()}


def test_resume_keeps_zeros_zero_and_matches_the_uninterrupted_run(tiny_corpus, tmp_path):
    """Resumed from the end of epoch 1 with only <run>/config.yaml: epochs 2-3 give the same network."""
    args = [*base_args(tiny_corpus), "--trainer.max_epochs", "4", "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "null"]
    args += pruning_args(sparsity=0.6, scope="layer", end_epoch=2)
    whole = fit(tmp_path / "whole", args)
    run = whole.run
    by_epoch = {int(p.name[len("best-epoch") :][:2]): p for p in (run / "checkpoints").glob("best-epoch*.ckpt")}
    assert sorted(by_epoch) == [0, 1, 2, 3]

    def plain(path: Path) -> dict[str, torch.Tensor]:
        return {k[len("network.") :]: v for k, v in torch.load(path, weights_only=False)["state_dict"].items()}

    # Epoch 3 trains at the target: more optimizer steps, the same zeros.
    epoch2, final = plain(by_epoch[2]), {k: v.detach() for k, v in whole.model.network.state_dict().items()}
    for name in zeros(whole.model.network):
        assert torch.equal(epoch2[name] == 0, final[name] == 0)
        assert not torch.equal(epoch2[name], final[name])

    config = yaml.safe_load((run / "config.yaml").read_text())
    saved = [c for c in config["trainer"]["callbacks"] if c["class_path"] == PRUNING]
    assert saved and saved[0]["init_args"]["sparsity"] == 0.6 and saved[0]["init_args"]["scope"] == "layer"
    probe = ["--trainer.callbacks+=test_pruning.MaskProbe"]
    resumed = fit(tmp_path / "resumed", ["-c", str(run / "config.yaml"), *probe, "--ckpt_path", str(by_epoch[1])])
    assert resumed.trainer.current_epoch == 4 and callback(resumed).sparsity == 0.6
    # Before the first resumed step the checkpoint's masks are back on the network.
    restored = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "MaskProbe").masks
    saved_masks = torch.load(by_epoch[1], weights_only=False)["callbacks"]["MagnitudePruning"]["masks"]
    assert sorted(restored) == sorted(saved_masks) and all(torch.equal(restored[n], saved_masks[n]) for n in saved_masks)
    resumed_net = resumed.model.network
    at_resume = plain(by_epoch[1])
    for name, zero in zeros(resumed_net).items():
        assert int(zero.sum()) == round(0.6 * zero.numel())  # the same final sparsity
        assert zero[at_resume[name] == 0].all()  # what was pruned before the resume stayed zero
    for name, value in resumed_net.state_dict().items():
        assert_close(value, final[name], **EXACT)


def test_preset_stacks_with_default_and_another_callback_preset(tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text("trainer:\n  callbacks+:\n    - class_path: lightning.pytorch.callbacks.ModelSummary\n")
    for stack in (["-c", str(ROOT / "configs/memory/pruning.yaml"), "-c", str(other)], ["-c", str(other), "-c", str(ROOT / "configs/memory/pruning.yaml")]):
        with pytest.raises(SystemExit):
            main(["fit", "-c", str(ROOT / "configs/default.yaml"), *stack, "--print_config"])
        callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
        assert sorted(c["class_path"] for c in callbacks) == ["lightning.pytorch.callbacks.ModelSummary", PRUNING]
        assert next(c for c in callbacks if c["class_path"] == PRUNING)["init_args"]["sparsity"] == 0.8


# --- sparse export ----------------------------------------------------------------------------------------
def test_sparse_export_is_small_and_loads_to_the_same_logits(tmp_path):
    export = pytest.importorskip("lm_lightning.export.writer")
    torch.manual_seed(0)
    model = LanguageModel(LSTMNetwork(500, embedding_dim=64, hidden_dim=64, num_layers=1, dropout=0.0, tie_weights=False)).eval()
    dense = export.export_model(copy.deepcopy(model.network), tmp_path / "dense")
    cb = set_up(model, scope="layer")
    cb.apply_pruning(0.9)
    # The export step's own function: a plain copy of the network, exported (float32, then --export.bits 8).
    sparse = export_network(model.network, tmp_path / "sparse", None, 32, metadata={"MagnitudePruning": cb.export_metadata()})
    int8 = export_network(model.network, tmp_path / "int8", 8, 32, metadata={"MagnitudePruning": cb.export_metadata()})
    ratio, ratio_int8 = sparse["bytes"] / dense["bytes"], int8["bytes"] / dense["bytes"]
    assert ratio < 0.35, f"sparse fp32 export is {ratio:.1%} of dense"
    assert ratio_int8 < 0.7 * ratio, f"sparse int8 export is {ratio_int8:.1%} of dense, sparse fp32 {ratio:.1%}"
    assert hasattr(model.network.lstm, "weight_hh_l0_mask")  # the export made a copy permanent, not the model

    ids = torch.randint(0, 500, (2, 9))
    loaded = export.load_exported(tmp_path / "sparse")
    assert_close(loaded(ids)[0], model(ids)[0], **EXACT)
    assert int((loaded.lstm.weight_hh_l0 == 0).sum()) == round(0.9 * loaded.lstm.weight_hh_l0.numel())


def test_restored_masks_keep_zeros_zero_through_optimizer_steps():
    """A checkpoint holds plain weights and the masks; the masks go back on, and steps cannot revive a zero."""
    torch.manual_seed(0)
    model = LanguageModel(LSTMNetwork(30, embedding_dim=16, hidden_dim=16, num_layers=2, dropout=0.0))
    cb = set_up(model, scope="layer")
    cb.apply_pruning(0.5)
    state, masks = {k: v.clone() for k, v in cb._make_pruning_permanent_on_state_dict(model).items()}, cb.state_dict()["masks"]

    fresh = LanguageModel(LSTMNetwork(30, embedding_dim=16, hidden_dim=16, num_layers=2, dropout=0.0))
    fresh.load_state_dict(state)  # a plain model: the checkpoint loads without this callback too
    resumed = set_up(fresh, scope="layer")
    resumed.load_state_dict({"masks": masks})
    resumed.on_train_start(None, fresh)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    ids = torch.randint(0, 30, (3, 7))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(fresh(ids)[0].reshape(-1, 30), ids.reshape(-1)).backward()
        optimizer.step()
    resumed.make_pruning_permanent(fresh)
    for name, (module, attr) in prunable_weights(fresh.network)[0].items():
        weight = getattr(module, attr)
        assert (weight[~masks[name]] == 0).all() and int((weight == 0).sum()) == round(0.5 * weight.numel())
        assert not torch.equal(weight, state[f"network.{name}"])  # the kept weights did train
    assert fresh.network.decoder.weight is fresh.network.embedding.weight
