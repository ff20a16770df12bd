"""Hostile inputs of every kind the pipeline reads: no file can run code.

Each payload would create a marker file under tmp_path if any of it ran. Every test checks the marker is
absent and that the reader said so in one ProbegenError line (or, for an inert stand-in, that nothing
ran). Where a payload is crafted by hand, a control shows it is live: the plain unpickler (what
torch.load(weights_only=False) uses) does create the marker.

The README's table "Files the pipeline reads, and why none can run code" points at these tests.
"""

import ast
import gzip
import io
import os
import pickle
import pickletools
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from probegen import saved
from probegen.errors import ProbegenError
from probegen.nets import siren
from probegen.zoo import download, splits
from probegen.zoo.formats import dwsnets_inr, small_cnn_zoo
from probegen.zoo.formats import wild_park as wild_park_format
from probegen.zoo.packed import load_packed

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = [2, 3, 4, 5]


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a payload ran"


def write_code(marker):
    return f"open({str(marker)!r}, 'w').close()"


# -----------------------------------------------------------------------------------------------------
# payloads: Python objects whose __reduce__ calls something, and a small assembler for crafted pickles


class Reduce:
    """Pickles as fn(*args): what a malicious __reduce__ does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def object_payloads(marker):
    """{name: (object, the global the loader must name)}"""
    return {
        "os.system": (Reduce(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "exec": (Reduce(exec, write_code(marker)), "builtins.exec"),
        "eval": (Reduce(eval, write_code(marker)), "builtins.eval"),
        "subprocess": (Reduce(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
    }


class G:
    """A global named by the pickle (GLOBAL for protocols 2-3, STACK_GLOBAL from 4)."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """fn(*args) by REDUCE; fn and args are nodes or plain values."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args


class StackGlobal:
    """STACK_GLOBAL on a module and a name that the pickle computes (nodes)."""

    def __init__(self, module, name):
        self.module, self.name = module, name


def craft(node, protocol):
    """A pickle (bytes) of the node tree, root wrapped in a Wild Park-shaped dict."""
    out = bytearray(pickle.PROTO + bytes([protocol]))
    out += pickle.EMPTY_DICT + pickle.MARK
    for key, value in (("model", {}), ("config", node), ("last_result", {})):
        _emit(key, protocol, out)
        _emit(value, protocol, out)
    out += pickle.SETITEMS + pickle.STOP
    return bytes(out)


def _emit(node, protocol, out):
    if isinstance(node, G):
        if protocol >= 4:
            _emit(node.module, protocol, out)
            _emit(node.name, protocol, out)
            out += pickle.STACK_GLOBAL
        else:
            out += pickle.GLOBAL + f"{node.module}\n{node.name}\n".encode()
    elif isinstance(node, StackGlobal):
        _emit(node.module, protocol, out)
        _emit(node.name, protocol, out)
        out += pickle.STACK_GLOBAL
    elif isinstance(node, Call):
        _emit(node.fn, protocol, out)
        out += pickle.MARK
        for arg in node.args:
            _emit(arg, protocol, out)
        out += pickle.TUPLE + pickle.REDUCE
    else:
        out += _plain_body(node, protocol)


def _plain_body(value, protocol):
    """The opcodes of a plain value, without PROTO, FRAME and STOP, and without memo (fast mode)."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol)
    pickler.fast = True
    pickler.dump(value)
    data = buf.getvalue()
    ops = list(pickletools.genops(data))
    first = 1 if ops[1][0].name != "FRAME" else 2
    return data[ops[first][2]:ops[-1][2]]


def code_args(code):
    """types.CodeType's constructor arguments for this Python (3.10 has no qualname / exceptiontable)."""
    head = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_nlocals,
            code.co_stacksize, code.co_flags, code.co_code, code.co_consts, code.co_names, code.co_varnames,
            code.co_filename, code.co_name)
    if sys.version_info >= (3, 11):
        return head + (code.co_qualname, code.co_firstlineno, code.co_linetable, code.co_exceptiontable,
                       code.co_freevars, code.co_cellvars)
    return head + (code.co_firstlineno, code.co_linetable, code.co_freevars, code.co_cellvars)


def gadgets(marker):
    """{name: (node, a fragment of the refusal)}: a route into every module the loader allows names from."""
    cmd, code = f"touch {marker}", write_code(marker)
    function_type = G("omegaconf", "OmegaConf.to_container.__class__")
    code_type = G("omegaconf", "OmegaConf.to_container.__code__.__class__")
    as_str = G("builtins", "str")
    return {
        # the route: code and function types reached through OmegaConf, then called
        "omegaconf_code_type": (Call(Call(function_type, Call(code_type, *code_args(compile(code, "x", "exec"))),
                                          {})), "omegaconf.OmegaConf.to_container.__class__"),
        "omegaconf_module_os": (Call(G("omegaconf._utils", "os.system"), cmd), "omegaconf._utils.os.system"),
        "builtins_getattr": (Call(Call(G("builtins", "getattr"), Call(G("builtins", "__import__"), "os"), "system"),
                                  cmd), "builtins.getattr"),
        "builtins_exec": (Call(G("builtins", "exec"), code), "builtins.exec"),
        "builtins_type_3_args": (Call(G("builtins", "type"), "X", (), {}), "builtins.type on 3 arguments"),
        "typing_eval": (Call(G("typing", "_eval_type"), Call(G("typing", "ForwardRef"), f"{code} or int"), {}, {}),
                        "typing._eval_type"),
        "typing_subscript_dict": (Call(G("_operator", "getitem"), {"k": 1}, "k"), "operator.getitem on a dict"),
        "collections_namedtuple": (Call(G("collections", "namedtuple"), "T", "a"), "collections.namedtuple"),
        "numpy_runstring": (Call(G("numpy.testing._private.utils", "runstring"), code, {}),
                            "numpy.testing._private.utils.runstring"),
        "numpy_dotted_os": (Call(G("numpy", "testing._private.utils.os.system"), cmd), "numpy.testing"),
        "torch_module_os": (Call(G("torch.serialization", "os.system"), cmd), "torch.serialization.os.system"),
        "torch_rebuild_trampoline": (Call(G("torch._tensor", "_rebuild_from_type_v2"), G("posix", "system"),
                                          G("torch", "Tensor"), (cmd,), {}), "posix.system"),
        "pathlib_write_text": (Call(G("pathlib", "Path.write_text"), Call(G("pathlib", "Path"), str(marker)), "x"),
                               "pathlib.Path.write_text"),
        "computed_names": (Call(StackGlobal(Call(as_str, b"posix", "ascii"), Call(as_str, b"system", "ascii")), cmd),
                           "posix.system"),
    }


LIVE = ["omegaconf_code_type", "omegaconf_module_os", "builtins_getattr", "builtins_exec", "typing_eval",
        "numpy_runstring", "numpy_dotted_os", "torch_module_os", "pathlib_write_text", "computed_names"]


def as_zip_checkpoint(data_pkl, path):
    """A torch zip checkpoint whose data.pkl is the crafted pickle (the other records from torch.save)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return path


def as_legacy_checkpoint(data_pkl, path, where="object"):
    """torch's legacy format: magic number, protocol, sys info, the object, storage keys, each a pickle."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION
    records = [pickle.dumps(MAGIC_NUMBER, 2), pickle.dumps(PROTOCOL_VERSION, 2),
               pickle.dumps({"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, 2),
               pickle.dumps({}, 2), pickle.dumps([], 2)]
    records[0 if where == "header" else 3] = data_pkl
    path.write_bytes(b"".join(records))
    return path


def assert_refused(err, path, fragment):
    message = str(err.value)
    assert "\n" not in message and str(path) in message and fragment in message, message


# -----------------------------------------------------------------------------------------------------
# Wild Park checkpoints: the restricted unpickler


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", ["os.system", "exec", "eval", "subprocess"])
def test_wild_park_refuses_reduce_payloads(tmp_path, marker, kind, protocol, container):
    payload, name = object_payloads(marker)[kind]
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "config": {"model": payload}, "last_result": {}}, path, pickle_protocol=protocol,
               _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(ProbegenError, match="refused") as err:
        wild_park_format.load_checkpoint(path)
    assert_refused(err, path, name)


def test_object_payloads_are_live(tmp_path, marker):
    path = tmp_path / "checkpoint.pt"
    for kind, (payload, _) in object_payloads(marker).items():
        torch.save({"config": payload}, path)
        torch.load(path, weights_only=False)  # the unrestricted loader runs it
        assert marker.exists(), kind
        marker.unlink()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", sorted(gadgets(Path("m"))))
def test_wild_park_refuses_crafted_gadgets(tmp_path, marker, name, protocol):
    node, fragment = gadgets(marker)[name]
    data = craft(node, protocol)
    for path in (as_zip_checkpoint(data, tmp_path / "zip.pt"), as_legacy_checkpoint(data, tmp_path / "legacy.pt")):
        with pytest.raises(ProbegenError, match="refused") as err:
            wild_park_format.load_checkpoint(path)
        assert_refused(err, path, fragment)


@pytest.mark.parametrize("name", LIVE)
def test_crafted_gadgets_are_live(tmp_path, marker, name):
    """Protocol 4: the plain unpickler resolves dotted names attribute by attribute, as the old loader did."""
    node, _ = gadgets(marker)[name]
    pickle.loads(craft(node, 4))
    assert marker.exists()
    marker.unlink()


def test_wild_park_refuses_a_payload_in_the_legacy_header(tmp_path, marker):
    node, _ = gadgets(marker)["builtins_exec"]
    path = as_legacy_checkpoint(craft(node, 2), tmp_path / "legacy.pt", where="header")
    with pytest.raises(ProbegenError) as err:
        wild_park_format.load_checkpoint(path)
    assert_refused(err, path, "builtins.exec")


def test_a_foreign_global_is_an_inert_stand_in(tmp_path, marker):
    """A module this machine need not have (neural-graphs', Ray's) is never imported: called or built,
    its stand-in only records the arguments. The checkpoint is then refused for what it lacks."""
    for protocol in PROTOCOLS:
        (tmp_path / "raw/t/checkpoint_000001").mkdir(parents=True, exist_ok=True)
        path = as_zip_checkpoint(craft(Call(G("experiments.evil", "run"), f"touch {marker}"), protocol),
                                 tmp_path / "raw/t/checkpoint_000001/checkpoint.pt")
        config = wild_park_format.load_checkpoint(path)["config"]
        assert isinstance(config, wild_park_format._StandIn) and config.args == (f"touch {marker}",)
        with pytest.raises(ProbegenError, match="config lacks"):
            wild_park_format.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
        assert "experiments.evil" not in sys.modules


def test_the_allowlist_is_exact_pairs():
    table = wild_park_format.safe_globals()
    assert all(isinstance(m, str) and isinstance(n, str) and "." not in n for m, n in table)
    assert {m.split(".")[0] for m, _ in table} == {"torch", "builtins", "collections", "typing", "pathlib",
                                                   "numpy", "operator", "_operator", "_codecs", "omegaconf"}
    omegaconf = sorted(n for m, n in table if m.startswith("omegaconf"))
    assert omegaconf == sorted(n for _, n in wild_park_format.OMEGACONF_GLOBALS)
    for module, name in [("builtins", "getattr"), ("builtins", "eval"), ("omegaconf", "OmegaConf"),
                         ("numpy", "load"), ("torch", "load"), ("collections", "namedtuple"), ("posix", "system")]:
        with pytest.raises(wild_park_format.UnsafeGlobal):
            wild_park_format.find_global(module, name)
    # the three guarded ones do only what pickle itself asks of them
    find = wild_park_format.find_global
    assert find("__builtin__", "type")(None) is type(None) and find("_codecs", "encode")("\xe9", "latin1") == b"\xe9"
    assert find("_operator", "getitem")(find("typing", "List"), int) == find("typing", "List")[int]
    for call in (lambda: find("builtins", "type")("X", (), {}), lambda: find("_codecs", "encode")("x", "rot13"),
                 lambda: find("operator", "getitem")({"k": 1}, "k"), lambda: find("operator", "getitem")(
                     find("typing", "List"), "int")):
        with pytest.raises(wild_park_format.UnsafeGlobal):
            call()


# -----------------------------------------------------------------------------------------------------
# DWSNets INR checkpoints: torch.load(weights_only=True)


def siren_state():
    return {name: torch.zeros(shape) for name, shape in siren.param_shapes(siren.DWSNETS_ARCH)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dwsnets_checkpoint_with_a_payload_is_refused(tmp_path, marker, protocol):
    for kind, (payload, _) in object_payloads(marker).items():
        path = tmp_path / f"{kind}.pth"
        torch.save({**siren_state(), "label": payload}, path, pickle_protocol=protocol)
        with pytest.raises(ProbegenError, match="unreadable checkpoint") as err:
            dwsnets_inr.read_checkpoint(path)
        assert_refused(err, path, "Weights only load failed")
    node, _ = gadgets(marker)["omegaconf_code_type"]
    path = as_zip_checkpoint(craft(node, protocol), tmp_path / "crafted.pth")
    with pytest.raises(ProbegenError, match="unreadable checkpoint"):
        dwsnets_inr.read_checkpoint(path)


# -----------------------------------------------------------------------------------------------------
# the project's own run files: probegen/saved.py


def run_record(**override):
    return {"format": "probegen-run", "version": 1, "zoo": "z", "method": "mlp", "seed": 0, "method_cfg": {},
            "num_probes": None, "state_dict": {}, "test_pred": torch.zeros(2), "test_target": torch.zeros(2),
            "metrics": {}, **override}


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_run_file_with_a_payload_is_refused(tmp_path, marker, protocol, container):
    for kind, (payload, name) in object_payloads(marker).items():
        path = tmp_path / f"{kind}.pt"
        torch.save(run_record(metrics={"test": payload}), path, pickle_protocol=protocol,
                   _use_new_zipfile_serialization=container == "zip")
        with pytest.raises(ProbegenError, match="refused by the safe loader") as err:
            saved.load_run(path)
        if protocol <= 3:  # torch's line names the global its own way
            assert_refused(err, path, "GLOBAL")
            assert name.rsplit(".", 1)[1] in str(err.value)
        else:  # torch's safe loader stops at the first protocol-4 frame, before any global
            assert_refused(err, path, "WeightsUnpickler error: Unsupported operand")
    node, _ = gadgets(marker)["pathlib_write_text"]
    path = as_zip_checkpoint(craft(node, protocol), tmp_path / "crafted.pt")
    with pytest.raises(ProbegenError, match="refused by the safe loader"):
        saved.load_run(path)


# -----------------------------------------------------------------------------------------------------
# the Small CNN Zoo: weights.npy (never unpickled), metrics.csv.gz and layout.csv (never evaluated)


def small_cnn_folder(root, n=2):
    metrics = pd.DataFrame({c: [0.1] * n for c in small_cnn_zoo.REQUIRED_METRICS})
    metrics["config.activation"], metrics["config.optimizer"] = "relu", "adam"
    metrics["modeldir"], metrics["step"] = [f"run{i}" for i in range(n)], 86
    small_cnn_zoo.write_zoo(root, np.zeros((n, small_cnn_zoo.NUM_PARAMS), np.float32), metrics)
    return root


@pytest.mark.parametrize("weights", ["object_array", "bare_pickle"])
def test_small_cnn_weights_holding_a_pickle_are_refused(tmp_path, marker, weights):
    root = small_cnn_folder(tmp_path / "raw")
    payload = object_payloads(marker)["os.system"][0]
    if weights == "object_array":
        np.save(root / "weights.npy", np.array([payload], dtype=object), allow_pickle=True)
    else:
        (root / "weights.npy").write_bytes(pickle.dumps(payload))
    with pytest.raises(ProbegenError, match="weights.npy") as err:
        small_cnn_zoo.pack(root, tmp_path / "packed", progress=False)
    assert "\n" not in str(err.value)


def test_small_cnn_tables_are_parsed_not_evaluated(tmp_path, marker):
    code = f"__import__('os').system('touch {marker}')"
    root = small_cnn_folder(tmp_path / "raw")
    layout = pd.read_csv(root / "layout.csv")
    layout.loc[0, "shape"] = code
    layout.to_csv(root / "layout.csv", index=False)
    with pytest.raises(ProbegenError, match="is not a tuple of ints"):
        small_cnn_zoo.pack(root, tmp_path / "packed", progress=False)
    root = small_cnn_folder(tmp_path / "raw2")
    metrics = pd.read_csv(root / "metrics.csv.gz")
    metrics["config.activation"] = code
    with open(root / "metrics.csv.gz", "wb") as f, gzip.GzipFile("", "wb", fileobj=f) as gz:
        gz.write(metrics.to_csv(index=False).encode())
    with pytest.raises(ProbegenError, match="unknown config.activation"):
        small_cnn_zoo.pack(root, tmp_path / "packed", progress=False)


# -----------------------------------------------------------------------------------------------------
# split files (JSON, one row index a line), the packed zoo (.npy, JSON, CSV)


def test_split_files_hold_nothing_executable(tmp_path, marker):
    code = f"__import__('os').system('touch {marker}')"
    meta = pd.DataFrame({"id": ["a/checkpoint.pt", "b/checkpoint.pt"], "row": [0, 1], "step": [86, 86]})
    pickled = tmp_path / "pickled.json"
    pickled.write_bytes(pickle.dumps(object_payloads(marker)["os.system"][0], protocol=0))  # text
    with pytest.raises(ProbegenError, match="not valid JSON"):
        splits.wild_park_official_split(pickled, meta)
    hostile = tmp_path / "hostile.json"
    hostile.write_text('{"train": {"path": ["%s"]}, "val": {"path": []}, "test": {"path": []}}' % code.replace("'", "\\'"))
    with pytest.raises(ProbegenError):
        splits.wild_park_official_split(hostile, meta)
    order = tmp_path / "order.csv"
    order.write_text(f"0\n{code}\n1\n")
    with pytest.raises(ProbegenError, match="is not a row index"):
        splits.small_cnn_official_split(order, meta)


def test_packed_zoo_arrays_are_never_unpickled(tmp_path, marker):
    from probegen.zoo.packed import PackedWriter
    root = tmp_path / "zoo"
    spec = {"family": "siren", "task": "classification", "num_classes": 10, "format": "test"}
    with PackedWriter(root, capacity=1, total_params=1185, spec=spec) as w:
        w.add(np.zeros((1, 1185), np.float32), [1], [{}], [siren.DWSNETS_ARCH], ["m0"])
    payload = object_payloads(marker)["os.system"][0]
    for name in ("labels.npy", "offsets.npy", "weights.npy"):
        good = (root / name).read_bytes()
        np.save(root / name, np.array([payload], dtype=object), allow_pickle=True)
        with pytest.raises((ValueError, ProbegenError), match="allow_pickle|pickled|Python objects"):
            load_packed(root)
        (root / name).write_bytes(good)
    assert len(load_packed(root)) == 1


# -----------------------------------------------------------------------------------------------------
# the code itself: no deserialiser that can run code


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            # owner: the module or object a method is called on; None for a bare name, "?" for an expression
            owner = None if isinstance(fn, ast.Name) else fn.value.id if isinstance(fn, ast.Attribute) and \
                isinstance(fn.value, ast.Name) else "?"
            yield owner, name, {k.arg: k.value for k in node.keywords}, node


def test_no_module_deserialises_with_code_execution():
    problems = []
    for path in sorted((ROOT / "probegen").rglob("*.py")) + sorted((ROOT / "stages").rglob("*.py")):
        for owner, name, kw, node in calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner in (None, "builtins") and name in ("eval", "exec", "compile", "__import__"):  # not x.eval()
                problems.append(f"{where}: {name}()")
            if owner in ("pickle", "marshal", "dill", "cloudpickle", "joblib") and name.startswith("load"):
                problems.append(f"{where}: {owner}.{name}()")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
                problems.append(f"{where}: yaml.{name}()")
            if owner == "pd" and name == "read_pickle":
                problems.append(f"{where}: pd.read_pickle()")
            allow = kw.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{where}: allow_pickle other than False")
            if owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                restricted = isinstance(kw.get("pickle_module"), ast.Name) and kw["pickle_module"].id == "_RESTRICTED_PICKLE"
                if not (isinstance(wo, ast.Constant) and wo.value is True) and not restricted:
                    problems.append(f"{where}: torch.load without weights_only=True")
    assert problems == []


def test_small_cnn_shapes_are_read_with_literal_eval():
    source = (ROOT / "probegen/zoo/formats/small_cnn_zoo.py").read_text()
    assert "ast.literal_eval(" in source and "eval(" not in source.replace("ast.literal_eval(", "")


# -----------------------------------------------------------------------------------------------------
# archives


def zip_with(path, entries):
    """entries: [(ZipInfo or name, bytes)]"""
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def tar_with(path, members):
    """members: [TarInfo, optional bytes]"""
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_info(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def hostile_archives():
    """{case: (build(folder) -> archive, fragment of the refusal)}"""
    good = (tar_info("zoo/ok.pth"), b"ok")
    return {
        "zip_dotdot": (lambda d: zip_with(d / "a.zip", [("zoo/ok", b"ok"), ("../../escaped", b"x")]), "outside"),
        "zip_absolute": (lambda d: zip_with(d / "b.zip", [("/tmp/escaped", b"x")]), "outside"),
        "zip_backslash": (lambda d: zip_with(d / "c.zip", [("..\\escaped", b"x")]), "outside"),
        "zip_drive": (lambda d: zip_with(d / "d.zip", [("C:/escaped", b"x")]), "outside"),
        "tar_dotdot": (lambda d: tar_with(d / "e.tar", [good, (tar_info("zoo/../../escaped"), b"x")]), "outside"),
        "tar_absolute": (lambda d: tar_with(d / "f.tar", [(tar_info("/tmp/escaped"), b"x")]), "outside"),
        "tar_symlink_out": (lambda d: tar_with(d / "g.tar", [(tar_info("zoo/l", tarfile.SYMTYPE, "../../x"), None)]),
                            "links outside"),
        "tar_symlink_abs": (lambda d: tar_with(d / "h.tar", [(tar_info("zoo/l", tarfile.SYMTYPE, "/etc"), None)]),
                            "links outside"),
        # each link alone looks inside; the second goes through the first to the parent of the target
        "tar_symlink_chain": (lambda d: tar_with(d / "i.tar", [
            (tar_info("zoo", tarfile.DIRTYPE), None), (tar_info("zoo/up", tarfile.SYMTYPE, ".."), None),
            (tar_info("zoo/up2", tarfile.SYMTYPE, "up/.."), None), (tar_info("zoo/up2/escaped"), b"x")]),
            "outside"),
        "tar_hardlink_out": (lambda d: tar_with(d / "j.tar", [(tar_info("zoo/h", tarfile.LNKTYPE, "../../x"), None)]),
                             "links outside"),
        "tar_hardlink_abs": (lambda d: tar_with(d / "k.tar", [(tar_info("zoo/h", tarfile.LNKTYPE, "/etc/passwd"), None)]),
                             "links outside"),
        "tar_char_device": (lambda d: tar_with(d / "l.tar", [good, (tar_info("zoo/tty", tarfile.CHRTYPE), None)]),
                            "device file or FIFO"),
        "tar_block_device": (lambda d: tar_with(d / "m.tar", [(tar_info("zoo/sda", tarfile.BLKTYPE), None)]),
                             "device file or FIFO"),
        "tar_fifo": (lambda d: tar_with(d / "n.tar", [(tar_info("zoo/pipe", tarfile.FIFOTYPE), None)]),
                     "device file or FIFO"),
    }


@pytest.mark.parametrize("case", sorted(hostile_archives()))
def test_hostile_archives_are_refused_and_write_nothing(tmp_path, case):
    (tmp_path / "src").mkdir()
    build, fragment = hostile_archives()[case]
    archive = build(tmp_path / "src")
    target = tmp_path / "deep" / "out" / "zoo"
    with pytest.raises(ProbegenError, match="refusing member") as err:
        download.extract(archive, target)
    assert fragment in str(err.value) and str(archive) in str(err.value) and "\n" not in str(err.value)
    assert not target.exists() and os.listdir(tmp_path / "deep" / "out") == []
    assert sorted(os.listdir(tmp_path)) == ["deep", "src"] and os.listdir(tmp_path / "deep") == ["out"]


def test_zip_symlink_entries_become_plain_files(tmp_path):
    info = zipfile.ZipInfo("zoo/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16  # a symlink entry, as `zip --symlinks` writes it
    archive = zip_with(tmp_path / "links.zip", [(info, b"../../../etc/passwd"), ("zoo/ok.pth", b"ok")])
    download.extract(archive, tmp_path / "out")
    link = tmp_path / "out" / "zoo" / "link"
    assert not link.is_symlink() and link.read_bytes() == b"../../../etc/passwd"
