"""Models of one's own: a PyTorch module exported with ``export_module``, verified, and
streamed through a real server exactly as torch computes it; modules that cannot
stream are refused with a reason and never published."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rnnserve.client import AsyncClient
from rnnserve.errors import ExportError, VerificationError
from rnnserve.export import repository
from rnnserve.export.metadata import ModelMetadata
from rnnserve.export.module_export import export_module
from rnnserve.export.verify import fp16_bound
from rnnserve.server.runtime import ModelRuntime, RuntimeOptions

from ..server.serving import start_server


def _quiet(_: str) -> None:
    pass


class Tagger(nn.Module):
    """A frame tagger as users write them: PyTorch's LSTM state layout, (h, c)."""

    def __init__(self, causal: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(40, 32)
        self.rnn = nn.LSTM(32, 48, num_layers=2, batch_first=True)
        self.head = nn.Linear(48, 5)
        self.causal = causal

    def forward(self, x, state):
        y, state = self.rnn(torch.relu(self.inp(x)), state)
        if not self.causal:  # looks at the whole chunk: cannot stream
            y = y - y.mean(dim=1, keepdim=True)
        return self.head(y), state


class ByteGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.rnn = nn.GRU(16, 32, num_layers=3, batch_first=True)
        self.head = nn.Linear(32, 256)

    def forward(self, x, h):
        y, h = self.rnn(self.emb(x), h)
        return self.head(y), h


def _torch_whole(module: nn.Module, x: torch.Tensor, lstm: bool) -> np.ndarray:
    rnn = next(m for m in module.modules() if isinstance(m, nn.LSTM | nn.GRU))
    h = torch.zeros(rnn.num_layers, 1, rnn.hidden_size)
    with torch.no_grad():
        y, _ = module.eval()(x[None], (h, h.clone()) if lstm else h)
    return y[0].numpy()


def test_own_modules_export_verify_and_stream_through_the_server_as_torch_computes(
        tmp_path) -> None:
    torch.manual_seed(3)
    tagger, byte_gru = Tagger(), ByteGRU()
    repo = tmp_path / "repo"
    labels = ["sil", "a", "b", "c", "d"]
    mv = export_module(tagger, repo, "tagger", feature_size=40, labels=labels,
                       meaning="tag logits per frame", log=_quiet)
    export_module(byte_gru, repo, "bytes", input_kind="utf8_bytes", log=_quiet)
    assert mv.path == repo / "tagger" / "1" / "model.onnx"
    assert [m.name for m in repository.list_models(repo)] == ["bytes", "tagger"]

    rng = np.random.default_rng(4)
    frames = rng.standard_normal((23, 40)).astype(np.float32)
    text = "Streams of bytes, chunk by chunk. "
    want_tags = _torch_whole(tagger, torch.from_numpy(frames), lstm=True)
    want_bytes = _torch_whole(byte_gru, torch.tensor(list(text.encode())), lstm=False)

    server = start_server(repo, tmp_path / "server.log", "--max-batch-delay-ms", "2")

    async def main():
        async with AsyncClient(server.target) as client:
            meta = {m.name: m for m in await client.list_models()}
            tags, got = [], []
            async with client.stream("tagger") as s:
                for a, b in ((0, 5), (5, 6), (6, 23)):
                    tags.append((await s.send(frames[a:b], end=b == 23))["logits"])
            async with client.stream("bytes") as s:
                for a, b in ((0, 9), (9, 10), (10, len(text))):
                    got.append((await s.send(text[a:b], end=b == len(text)))["logits"])
            return meta, np.concatenate(tags), np.concatenate(got)

    try:
        meta, tags, got = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert server.stop() == 0
    assert float(np.abs(tags - want_tags).max()) <= 1e-5
    assert float(np.abs(got - want_bytes).max()) <= 1e-5
    tm = meta["tagger"]
    assert (tm.arch, tm.input_kind, list(tm.labels)) == ("lstm", "features", labels)
    assert tm.state_bytes_per_session == 2 * 2 * 48 * 4  # h and c, 2 layers of 48, float32
    assert (meta["bytes"].arch, meta["bytes"].input_kind) == ("gru", "utf8_bytes")


class DropTagger(Tagger):
    """Dropout between the layers: only the eval-mode module can be exported."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(32, 48, num_layers=2, batch_first=True, dropout=0.5)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, state):
        y, state = self.rnn(self.drop(torch.relu(self.inp(x))), state)
        return self.head(y), state


@pytest.mark.parametrize("make", [DropTagger, ByteGRU], ids=["lstm", "gru"])
def test_own_modules_export_in_fp16_within_its_bound_and_keep_their_train_mode(
        tmp_path, make) -> None:
    """A module in the middle of training (train mode, dropout) exports in eval mode,
    halves its state, passes the fp16 bound, runs chunked in the runtime within that
    bound of torch, and is handed back in train mode (its frozen part stays frozen)."""
    torch.manual_seed(5)
    module = make().train()
    byte = make is ByteGRU
    (module.emb if byte else module.inp).eval()
    mv = export_module(module, tmp_path, "m", input_kind="utf8_bytes" if byte else "features",
                       feature_size=None if byte else 40, fp16=True, log=_quiet)
    modes = {n: m.training for n, m in module.named_modules()}
    assert modes.pop("inp" if not byte else "emb") is False and all(modes.values())
    sess = ort.InferenceSession(str(mv.path), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.export["precision"] == "fp16" and meta.verification["passed"]
    assert [s.dtype for s in meta.states] == ["float16"] * len(meta.states)

    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, 30, dtype=np.uint8) if byte else \
        rng.standard_normal((30, 40)).astype(np.float32)
    want = _torch_whole(module, torch.from_numpy(x.astype(np.int64) if byte else x), not byte)
    rt = ModelRuntime(mv.path, "m", 1, RuntimeOptions(device="cpu"))
    state, ys = rt.zero_state(), []
    for a, b in ((0, 7), (7, 8), (8, 30)):
        outs, states = rt.run([x[a:b]], [state])
        ys.append(outs[0][0])
        state = states[0]
    assert all(s.dtype == np.float16 for s in state)
    got = np.concatenate(ys)
    assert 0 < float(np.abs(got - want).max()) <= fp16_bound(want)


class _NoRnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, h):
        return self.lin(x), h


class _TwoRnns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.GRU(4, 8, batch_first=True)
        self.b = nn.GRU(8, 8, batch_first=True)

    def forward(self, x, h):
        y, h = self.a(x, h)
        return self.b(y, h)


class _Layer(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, **kw)

    def forward(self, x, h):
        return self.rnn(x, h)


class _FlatOutput(_Layer):
    def forward(self, x, h):
        y, h = self.rnn(x, h)
        return y.sum(dim=1), h


@pytest.mark.parametrize(("module", "kw", "match"), [
    (_NoRnn(), {}, "has no nn.LSTM or nn.GRU"),
    (_TwoRnns(), {}, "has 2 recurrent layers"),
    (_Layer(batch_first=False), {}, r"forward failed.*its GRU has batch_first=False.*"
                                    r"transpose"),
    (_Layer(batch_first=True, bidirectional=True), {}, "is bidirectional"),
    (_Layer(batch_first=False, bidirectional=True), {}, "GRU is bidirectional"),
    (_FlatOutput(batch_first=True), {}, r"float32 \(batch, time, outputs\) tensor; y was "
                                        r"\(1, 8\)"),
    (_Layer(batch_first=True), {"input_kind": "pcm16"}, "input_kind must be one of"),
    (_Layer(batch_first=True), {"feature_size": 7}, "give feature_size|forward failed"),
    (_Layer(batch_first=True), {"labels": ["x"]}, "1 labels for 8 outputs"),
])
def test_modules_that_cannot_stream_are_refused_with_the_reason(tmp_path, module, kw,
                                                                match) -> None:
    with pytest.raises(ExportError, match=match):
        export_module(module, tmp_path / "repo", "m", log=_quiet, **kw)
    assert not (tmp_path / "repo").exists()  # refused before anything was written


class LearnedH0(nn.Module):
    """A GRU that starts from a learned state when none is given, a common pattern;
    ``fold``: the state kept relative to that h0, so that a zero state means it."""

    def __init__(self, fold: bool = False) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 16, num_layers=2, batch_first=True)
        self.h0 = nn.Parameter(torch.randn(2, 1, 16))
        self.head = nn.Linear(16, 5)
        self.fold = fold

    def forward(self, x, h=None):
        if self.fold:
            start = self.h0.expand(-1, x.shape[0], -1) if h is None else h + self.h0
            y, h = self.rnn(x, start.contiguous())
            return self.head(y), h - self.h0
        if h is None:
            h = self.h0.expand(-1, x.shape[0], -1).contiguous()
        y, h = self.rnn(x, h)
        return self.head(y), h


def test_a_module_starting_from_a_learned_state_is_refused_and_its_folded_form_serves(
        tmp_path) -> None:
    """Every session starts from zeros: a module whose ``forward(x)`` starts from a
    learned h0 would pass every check given the state and still be served other
    outputs than ``module(x)``. It is refused before anything is written; the folded
    form the message proposes is exported and computes ``module(x)`` from zeros."""
    torch.manual_seed(11)
    repo = tmp_path / "repo"
    learned = LearnedH0()
    with pytest.raises(ExportError, match=r"LearnedH0.forward without a state \(LearnedH0"
                                          r"\(x\), h=None\) does not start from zeros") as err:
        export_module(learned, repo, "h0", log=_quiet)
    assert "starts every session from a zero state" in str(err.value)
    assert "Fold the initial state into the module" in str(err.value)
    assert not repo.exists()

    folded = LearnedH0(fold=True)
    folded.load_state_dict(learned.state_dict())
    mv = export_module(folded, repo, "folded", log=_quiet)
    x = torch.randn(1, 23, 8)
    with torch.no_grad():
        want = learned.eval()(x)[0][0].numpy()  # as the user runs it: no state
    sess = ort.InferenceSession(str(mv.path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy(),
                                "h_in": np.zeros((1, 2, 16), dtype=np.float32)})[0][0]
    assert float(np.abs(got - want).max()) <= 1e-5


class SeqFirst(nn.Module):
    """A seq-first LSTM (``batch_first=False``) that ``forward`` transposes for."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x, state):
        y, state = self.rnn(x.transpose(0, 1), state)
        return self.head(y.transpose(0, 1)), state


def test_a_seq_first_layer_exports_when_forward_transposes_for_it(tmp_path) -> None:
    torch.manual_seed(12)
    module = SeqFirst()
    mv = export_module(module, tmp_path / "repo", "seq", log=_quiet)
    x = np.random.default_rng(13).standard_normal((29, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(mv.path), providers=["CPUExecutionProvider"])
    zeros = np.zeros((1, 2, 16), dtype=np.float32)
    got = sess.run(["logits"], {"input": x[None], "h_in": zeros, "c_in": zeros})[0][0]
    want = _torch_whole(module, torch.from_numpy(x), lstm=True)
    assert float(np.abs(got - want).max()) <= 1e-5


class _NeedsSpeaker(_Layer):
    def forward(self, x, h, speaker):  # an input rnnserve does not give
        y, h = self.rnn(x, h)
        return y + speaker, h


class _WrappedGruState(_Layer):
    def forward(self, x, h):
        y, h = self.rnn(x, h)
        return y, (h,)  # wrapped as an LSTM's (h, c) would be


def test_forward_failures_are_told_for_what_they_are(tmp_path) -> None:
    """The feature size is named only when it is what failed (then with the size the
    module runs on); a return of another shape is told as such, not as a failure of
    ``forward``."""
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match=r"forward failed.*; it runs on 40 features per "
                                          r"step, not 32 \(the LSTM's input size.*give "
                                          r"feature_size=40 \(--feature-size 40\)"):
        export_module(Tagger(), repo, "t", log=_quiet)
    with pytest.raises(ExportError, match="forward failed") as err:
        export_module(_NeedsSpeaker(batch_first=True), repo, "s", log=_quiet)
    assert "'speaker'" in str(err.value) and "feature" not in str(err.value)
    with pytest.raises(ExportError) as err:
        export_module(_WrappedGruState(batch_first=True), repo, "g", log=_quiet)
    assert "forward failed" not in str(err.value)
    assert ("_WrappedGruState.forward returned (Tensor[1, 8, 8], (Tensor[1, 1, 8],)); it "
            "must return (y, h) as the GRU does: y a (batch, time, outputs) tensor, h "
            "(layers, batch, hidden)") in str(err.value)
    assert not repo.exists()


def test_a_module_that_looks_at_the_whole_chunk_fails_verification_and_is_not_published(
        tmp_path) -> None:
    torch.manual_seed(5)
    repo = tmp_path / "repo"
    with pytest.raises(VerificationError, match="chunked vs whole"):
        export_module(Tagger(causal=False), repo, "tagger", feature_size=40, log=_quiet)
    assert repository.list_models(repo) == []
    assert list(repo.iterdir()) == []  # no version, no empty model folder, no staging left


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Your own PyTorch model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"print": _quiet})
    assert [m.name for m in repository.list_models(tmp_path / "models")] == ["tagger"]


MODULE_FILE = '''
import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self, hidden=48):
        super().__init__()
        self.inp = nn.Linear(40, 32)
        self.rnn = nn.LSTM(32, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x, state):
        y, state = self.rnn(torch.relu(self.inp(x)), state)
        return self.head(y), state


def wide():
    return Tagger(hidden=64)
'''


def test_the_cli_exports_a_module_with_its_trained_weights(tmp_path) -> None:
    """`rnnserve export WEIGHTS --module pkg:Name`, from the directory holding the
    user's code: the exported graph computes what the module with those weights does."""
    from ..cli.test_cli import assert_one_line_error, rnnserve

    (tmp_path / "mymodels.py").write_text(MODULE_FILE)
    import importlib.util

    spec = importlib.util.spec_from_file_location("mymodels_ref", tmp_path / "mymodels.py")
    assert spec is not None and spec.loader is not None
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    torch.manual_seed(8)
    trained = ref.Tagger()
    torch.save(trained.state_dict(), tmp_path / "tagger.pt")
    torch.save({"epoch": 3, "state_dict": ref.wide().state_dict()}, tmp_path / "wide.pt")

    proc = rnnserve("export", "tagger.pt", "--module", "mymodels:Tagger", "--repo", "models",
                    "--name", "tagger", "--feature-size", "40", "--labels", "a,b,c,d,e",
                    "--meaning", "tags", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "exported tagger version 1" in proc.stdout
    path = tmp_path / "models" / "tagger" / "1" / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.outputs[0].labels == ("a", "b", "c", "d", "e")
    assert meta.export["module_spec"] == "mymodels:Tagger"
    assert meta.verification["passed"] is True
    x = np.random.default_rng(9).standard_normal((1, 11, 40)).astype(np.float32)
    zeros = np.zeros((1, 2, 48), dtype=np.float32)
    got = sess.run(["logits"], {"input": x, "h_in": zeros, "c_in": zeros})[0]
    want = _torch_whole(trained, torch.from_numpy(x[0]), lstm=True)
    assert float(np.abs(got[0] - want).max()) <= 1e-5

    # verify never imports what a model file names: it says how to name the module
    again = rnnserve("verify", "models/tagger", "--no-write", cwd=tmp_path)
    said = again.stdout + again.stderr
    assert again.returncode == 0, said
    assert f"--module mymodels:Tagger --checkpoint {tmp_path / 'tagger.pt'}" in said
    assert "torch parity skipped" in said
    named = rnnserve("verify", "models/tagger", "--module", "mymodels:Tagger",
                     "--checkpoint", "tagger.pt", "--no-write", cwd=tmp_path)
    said = named.stdout + named.stderr
    assert named.returncode == 0 and "vs torch" in said, said

    # exported through the Python API (no weights file recorded): verify is told them
    export_module(trained, tmp_path / "models", "api", feature_size=40, log=_quiet)
    torch.manual_seed(9)
    torch.save(ref.Tagger().state_dict(), tmp_path / "other.pt")  # same shapes, not it
    told = rnnserve("verify", "models/api", "--module", "mymodels:Tagger", "--checkpoint",
                    "tagger.pt", "--no-write", cwd=tmp_path)
    said = told.stdout + told.stderr
    assert told.returncode == 0, said
    assert "comparing with mymodels:Tagger holding tagger.pt" in said and "vs torch" in said
    wrong = rnnserve("verify", "models/api", "--module", "mymodels:Tagger", "--checkpoint",
                     "other.pt", "--no-write", cwd=tmp_path)
    assert wrong.returncode == 1 and "onnx vs torch: largest difference" in wrong.stderr
    assert_one_line_error(rnnserve("verify", "models/api", "--module", "mymodels:Tagger",
                                   cwd=tmp_path), "--module needs --checkpoint")

    # a checkpoint dict holding the state dict, a factory instead of a class
    ok = rnnserve("export", "wide.pt", "--module", "mymodels:wide", "--repo", "models",
                  "--name", "wide", "--feature-size", "40", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr

    def fails(*args: str, needles: tuple[str, ...]) -> None:
        assert_one_line_error(rnnserve("export", *args, "--repo", "models", "--name", "x",
                                       cwd=tmp_path), *needles)

    fails("tagger.pt", "--module", "mymodels", needles=("package.module:Name",))
    fails("tagger.pt", "--module", "nosuch:Tagger", needles=("cannot import 'nosuch'",))
    fails("tagger.pt", "--module", "mymodels:Nope", needles=("has no 'Nope'",))
    fails("wide.pt", "--module", "mymodels:Tagger", needles=("do not fit Tagger",))
    fails("missing.pt", "--module", "mymodels:Tagger", needles=("not found",))
    fails("tagger.pt", "--feature-size", "40", needles=("--feature-size only with --module",))
    fails("tagger.pt", "--module", "mymodels:Tagger", needles=("give feature_size",))
    assert not (tmp_path / "models" / "x").exists()
