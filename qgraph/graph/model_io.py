"""Reading and writing ONNX models: the conventions every qgraph entry point follows.

- ``load`` takes a path, bytes, an ``onnx.ModelProto`` or an ``ir.Model`` and returns an
  ``ir.Model``. External data stays memory-mapped, and is checked first: a location that
  escapes the model's folder is refused, never read. Three exporter quirks are mended on
  the way in, each said in a warning: sparse initializers become dense ones (onnx_ir drops
  them), a graph input that shadows an initializer (older exporters list every weight as an
  input) becomes a plain constant, and a declared dimension of ``-1`` or ``0`` (Paddle's,
  older TF converters') becomes an unnamed dynamic one, as onnxruntime reads it.
- ``save`` writes into a temporary folder beside the destination and renames into place, so a
  failure never leaves a half-written model. It follows qgraph's output policy
  (``qgraph.outputs``): never over the model it was loaded from or any of its external-data
  files, never over a folder, symlink or device. It switches to external data when the
  tensors would not fit a 2 GiB protobuf, in a data file named afresh for each write, and
  stamps an IR version onnxruntime accepts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError, Message
from onnx import numpy_helper

from qgraph.atomic import staging_prefix
from qgraph.errors import (
    ModelLoadError,
    ModelSaveError,
    link_problem,
    not_a_regular_file,
    one_line,
)
from qgraph.graph.traversal import all_graphs, proto_graphs, proto_tensors
from qgraph.outputs import Inputs, check_output, same_file, shown
from qgraph.targets.runtime import MAX_ORT_IR_VERSION

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model

PROTOBUF_LIMIT_BYTES = 2**31
GRAPH_HEADROOM_BYTES = 64 * 2**20
"""Room left in the 2 GiB protobuf for everything that is not tensor data."""

EXTERNAL_TENSOR_MIN_BYTES = 1024
"""Tensors smaller than this stay inside the .onnx file when writing external data."""

SOURCE_PATH_KEY = "qgraph.source_path"
"""Key in ``ir.Model.meta`` (in memory only) holding the file a model was loaded from."""
SOURCE_DATA_KEY = "qgraph.source_data"
"""Key in ``ir.Model.meta`` (in memory only): the external-data files it was loaded with."""
VERSION_METADATA_KEY = "qgraph.version"
"""Key in a written model's ``metadata_props``: the qgraph version that compiled it."""
DATA_NAME_HEX_BYTES = 4
"""Random bytes in a data file's name (``<name>.<8 hex digits>.data``)."""

_ONNX_FIRST_BYTE = 0x08
"""A serialized ModelProto starts with field 1 (ir_version, varint): tag byte 0x08."""


def load(source: ModelSource, *, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """Return ``source`` as an ``ir.Model``, raising ``ModelLoadError`` with a one-line reason.

    ``base_dir`` resolves external data for bytes or ``ModelProto`` sources; a path source
    uses its own folder.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return _deserialize(source, "<ModelProto>", base_dir)
    if isinstance(source, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(source), "<bytes>")
        return _deserialize(proto, "<bytes>", base_dir)
    return _load_path(Path(source))


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelLoadError(f"{path}: {link_problem(path) or 'no such file'}")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX file")
    if problem := not_a_regular_file(path):
        raise ModelLoadError(problem)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot be read ({error.strerror})") from error
    proto = _parse(data, str(path))
    del data  # the proto holds the weights now; do not keep a second copy while deserializing
    model = _deserialize(proto, str(path), path.parent)
    model.meta[SOURCE_PATH_KEY] = str(path.resolve())
    model.meta[SOURCE_DATA_KEY] = tuple(
        str(Path(t.path).resolve()) for t in external_tensors(model)
    )
    return model


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{label}: is empty, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{label}: {_unparseable_reason(data)}") from error
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(f"{label}: {_unparseable_reason(data)}")
    return proto


def _unparseable_reason(data: bytes) -> str:
    if data[0] == _ONNX_FIRST_BYTE:
        return (
            "truncated or corrupt ONNX protobuf (it starts like a model but does not parse as one)"
        )
    return "not an ONNX model (the file is not a serialized onnx.ModelProto)"


def _deserialize(
    proto: onnx.ModelProto, label: str, base_dir: str | os.PathLike | None
) -> ir.Model:
    _check_proto(proto, label)
    try:
        model = ir.serde.deserialize_model(_densified(proto, label))
    except ModelLoadError:
        raise
    except Exception as error:  # onnx_ir raises many kinds on malformed protos
        raise ModelLoadError(f"{label}: malformed ONNX model ({_root_cause(error)})") from error
    if base_dir is not None:
        for function in model.functions.values():
            ir.external_data.set_base_dir(function.graph, base_dir)
        ir.external_data.set_base_dir(model.graph, base_dir)
    _check_external_data(model, label, None if base_dir is None else Path(base_dir))
    _constant_weight_inputs(model, label)
    _dynamic_dims(model, label)
    return model


def _root_cause(error: BaseException) -> str:
    """The innermost cause of ``error``, as one line (onnx_ir wraps the reason in
    "Error calling _deserialize_graph with: g")."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return one_line(f"{type(error).__name__}: {error}")


def _check_proto(proto: onnx.ModelProto, label: str) -> None:
    """Refuse, by name, what onnx_ir would reject with an opaque message: a value written twice
    in one graph, a tensor without an element type, and external data at a negative offset or
    length."""
    where = _undecodable_text(proto, "model")
    if where is not None:
        raise ModelLoadError(f"{label}: text field {where} is not valid UTF-8")
    for graph in proto_graphs(proto):
        _check_single_assignment(graph, label)
    for tensor in proto_tensors(proto):
        if tensor.data_type == onnx.TensorProto.UNDEFINED:
            raise ModelLoadError(f"{label}: tensor '{tensor.name}' has no element type (UNDEFINED)")
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key in ("offset", "length") and not _whole_number(entry.value):
                raise ModelLoadError(
                    f"{label}: tensor '{tensor.name}' has external-data {entry.key} "
                    f"'{entry.value}'; it must be a whole number >= 0"
                )


def _undecodable_text(message: Message, where: str) -> str | None:
    """The path of the first string field of ``message`` that is not UTF-8 (protobuf hands such
    proto2 strings over as bytes, which onnx_ir then fails to write), or None. A tensor's data
    is not walked, only its name."""
    if isinstance(message, onnx.TensorProto):
        return f"{where}.name" if isinstance(message.name, bytes) else None
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        single = isinstance(value, (str, bytes, Message))
        items = (
            {f"{where}.{field.name}": value}
            if single
            else {f"{where}.{field.name}[{index}]": item for index, item in enumerate(value)}
        )
        for path, item in items.items():
            if field.type == field.TYPE_STRING and isinstance(item, bytes):
                return path
            if field.type == field.TYPE_MESSAGE:
                found = _undecodable_text(item, path)
                if found is not None:
                    return found
    return None


def _check_single_assignment(graph: onnx.GraphProto, label: str) -> None:
    """Each value name is declared once in a graph: as an input, an initializer (which may
    give an input its default) or one node output."""
    writers = dict.fromkeys((value.name for value in graph.input), "a graph input")
    writers.update(dict.fromkeys((tensor.name for tensor in graph.initializer), "an initializer"))
    for node in graph.node:
        for name in node.output:
            if not name:
                continue
            if name in writers:
                raise ModelLoadError(
                    f"{label}: output '{name}' of node '{node.name}' ({node.op_type}) is "
                    f"declared twice in graph '{graph.name}': it is also {writers[name]}"
                )
            writers[name] = f"the output of node '{node.name}' ({node.op_type})"


def _whole_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _densified(proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """``proto`` with its sparse initializers as dense ones (a copy: the caller's is kept)."""
    sparse = proto.graph.sparse_initializer
    if not sparse:
        return proto
    names = ", ".join(f"'{tensor.values.name}'" for tensor in sparse)
    logger.warning("%s: sparse initializers %s stored dense", label, names)
    dense = onnx.ModelProto()
    dense.CopyFrom(proto)
    dense.graph.initializer.extend(_dense(tensor, label) for tensor in sparse)
    del dense.graph.sparse_initializer[:]
    return dense


def _dense(sparse: onnx.SparseTensorProto, label: str) -> onnx.TensorProto:
    """``values`` placed at ``indices``: linear indices ``[NNZ]`` or coordinates
    ``[NNZ, rank]`` (the two forms ONNX allows)."""
    name = sparse.values.name
    try:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dense = np.zeros(tuple(sparse.dims), values.dtype)
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values.reshape(-1)
        else:
            dense[tuple(indices.T)] = values.reshape(-1)
    except (ValueError, IndexError, TypeError) as error:
        raise ModelLoadError(
            f"{label}: sparse initializer '{name}' is malformed ({error})"
        ) from error
    return numpy_helper.from_array(dense, name)


FIRST_IR_VERSION_WITHOUT_INITIALIZER_INPUTS = 4
"""Before IR version 4 every initializer had to be a graph input too (onnx's IR.md)."""


def _constant_weight_inputs(model: ir.Model, label: str) -> None:
    """Graph inputs that are initializers too become constants: qgraph quantizes weights, and
    a caller's feed of one would reach nothing in the compiled model. A model older than IR
    version 4 (where that was the rule) is raised to 4, or the ONNX tools would read its
    initializers as undefined."""
    shadowing = [value for value in model.graph.inputs if value.const_value is not None]
    if not shadowing:
        return
    for value in shadowing:
        model.graph.inputs.remove(value)
    model.ir_version = max(model.ir_version, FIRST_IR_VERSION_WITHOUT_INITIALIZER_INPUTS)
    names = ", ".join(f"'{value.name}'" for value in shadowing[:5])
    more = f" and {len(shadowing) - 5} more" if len(shadowing) > 5 else ""
    logger.warning(
        "%s: inputs %s%s are initializers too; compiled as constant weights, no longer inputs",
        label,
        names,
        more,
    )


def _dynamic_dims(model: ir.Model, label: str) -> None:
    """Declared sizes of ``-1`` or ``0`` on graph inputs and outputs mean "any size" to their
    exporters and to onnxruntime: make them unnamed dynamic dimensions."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        shape = value.shape
        if shape is None or all(not isinstance(d, int) or d > 0 for d in shape):
            continue
        value.shape = ir.Shape([d if not isinstance(d, int) or d > 0 else None for d in shape])
        logger.warning("%s: '%s' has dimensions of -1 or 0, read as dynamic", label, value.name)


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every tensor of ``model`` on disk: initializers and tensor attributes of the main graph,
    of model-local functions, and of every graph nested in either (``traversal.all_graphs``)."""
    for _, tensor in _tensor_slots(model):
        if isinstance(tensor, ir.ExternalTensor):
            yield tensor


TensorOwner = tuple[ir.Value] | tuple[ir.Node, str] | tuple[ir.Node, str, int]
"""Where a tensor sits: an initializer's value, a node's TENSOR attribute (by key), or one
entry of a node's TENSORS attribute (by key and index)."""


def _tensor_slots(model: ir.Model) -> Iterator[tuple[TensorOwner, ir.TensorProtocol]]:
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield (value,), value.const_value
        for node in graph:
            for key, attr in node.attributes.items():
                if attr.type == ir.AttributeType.TENSOR:
                    yield (node, key), attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    for index, tensor in enumerate(attr.value):
                        yield (node, key, index), tensor


def _put_tensor(owner: TensorOwner, tensor: ir.TensorProtocol) -> None:
    """Put ``tensor`` where ``owner`` says (see ``TensorOwner``)."""
    if len(owner) == 1:
        owner[0].const_value = tensor
        return
    node, key = owner[0], owner[1]
    if len(owner) == 2:
        node.attributes[key] = ir.AttrTensor(key, tensor)
        return
    tensors = list(node.attributes[key].value)
    tensors[owner[2]] = tensor
    node.attributes[key] = ir.AttrTensors(key, tensors)


def _check_external_data(model: ir.Model, label: str, base_dir: Path | None) -> None:
    """Refuse a tensor anywhere in ``model`` whose external data is not a regular file inside
    ``base_dir`` (the model's folder) long enough for it."""
    for tensor in external_tensors(model):
        if base_dir is None:
            raise ModelLoadError(
                f"{label}: tensor '{tensor.name}' keeps its data in external file "
                f"'{tensor.location}'; load the model from its path (or pass base_dir)"
            )
        problem = _location_problem(tensor, base_dir)
        if problem is not None:
            raise ModelLoadError(f"{label}: {problem}")


def _location_problem(tensor: ir.ExternalTensor, base_dir: Path) -> str | None:
    """Why qgraph will not read ``tensor``'s external data relative to ``base_dir``, or None."""
    location = tensor.location
    if os.path.isabs(location):
        return (
            f"tensor '{tensor.name}' has external data at absolute location '{location}'; "
            "ONNX requires a path relative to the model's folder"
        )
    folder = base_dir.resolve()
    try:
        data_path = (folder / location).resolve()
        present = data_path.is_file()
    except (OSError, ValueError) as error:  # a NUL byte, a name too long
        reason = error.strerror if isinstance(error, OSError) else error
        return (
            f"tensor '{tensor.name}' has an external data location no file system takes "
            f"('{shown(location)}': {reason})"
        )
    if not data_path.is_relative_to(folder):
        return (
            f"tensor '{tensor.name}' points its external data outside the model's folder "
            f"('{location}'); refusing to read it"
        )
    if not present:
        return f"external data file '{location}' of tensor '{tensor.name}' is missing"
    if data_path.stat().st_nlink > 1:
        return (
            f"external data file '{location}' has several hard links, so it may alias a file "
            "outside the model's folder; onnx_ir refuses to map it (copy it)"
        )
    end = (tensor.offset or 0) + tensor.nbytes
    size = data_path.stat().st_size
    if end > size:
        return (
            f"external data file '{location}' is too short for tensor '{tensor.name}' "
            f"(needs {end} bytes, has {size})"
        )
    return None


def tensor_bytes(model: ir.Model) -> int:
    """Total bytes of initializer data in ``model``, subgraphs included, without reading it."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def needs_external_data(model: ir.Model) -> bool:
    """Whether ``model``'s tensors would push a single .onnx file past protobuf's 2 GiB limit."""
    return tensor_bytes(model) > PROTOBUF_LIMIT_BYTES - GRAPH_HEADROOM_BYTES


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """The files ``save`` wrote, and whether a file was there before."""

    path: Path
    data_path: Path | None
    replaced: bool = False

    @property
    def total_bytes(self) -> int:
        data = self.data_path.stat().st_size if self.data_path else 0
        return self.path.stat().st_size + data


def model_inputs(model: ir.Model, what: str = "the input model") -> dict[Path, str]:
    """The files ``model`` was loaded from or reads, each with what it is (``what`` names the
    model): its file and every external-data file, also those whose weights have been
    rewritten in memory since. Writing over any of them would destroy the input."""
    data = f"an external-data file of {what}"
    files = {Path(name): data for name in model.meta.get(SOURCE_DATA_KEY, ())}
    for tensor in external_tensors(model):
        files.setdefault(Path(tensor.path), data)
    source = model.meta.get(SOURCE_PATH_KEY)
    if source is not None:
        files[Path(source)] = what
    return files


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    inputs: Inputs | None = None,
) -> SavedModel:
    """Write ``model`` to ``path`` atomically; ``external_data=None`` decides by size.

    ``path`` must pass ``outputs.check_output`` against the files ``model`` came from
    (``model_inputs``) and ``inputs``. With external data, tensors of at least
    ``EXTERNAL_TENSOR_MIN_BYTES`` go to a data file beside the model, ``<name>.<8 hex
    digits>.data``, named afresh for each write: it is in place before the new model that
    reads it replaces the old one, so the pair on disk is consistent at every moment, and no
    existing file is written over. The data file the replaced model read, when qgraph wrote
    both, is removed afterwards.
    """
    protected = {**model_inputs(model), **(inputs or {})}
    replaced = check_output(path, protected, error=ModelSaveError)
    path = Path(path)
    _check_external_sources(model, path)
    use_external = needs_external_data(model) if external_data is None else external_data
    stale = _data_files_written_for(path)
    data_name = _fresh_data_name(path) if use_external else None
    try:
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(path), dir=path.parent))
        try:
            data_name = _write(model, staging, path, data_name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise ModelSaveError(f"{path}: cannot be written ({error.strerror or error})") from error
    _remove_stale(stale - {data_name}, path.parent, protected)
    return SavedModel(path, path.parent / data_name if data_name else None, replaced)


def _write(model: ir.Model, staging: Path, path: Path, data_name: str | None) -> str | None:
    """Write ``model`` into ``staging``, then move its data file (first) and itself in place;
    the data file's name, None when no tensor was large enough to go there."""
    with _ort_ir_version(model):
        if data_name is None:
            with _external_tensors_inlined(model):
                ir.save(model, staging / path.name)
        else:
            ir.save(
                model,
                staging / path.name,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            )
    data_file = staging / data_name if data_name else None
    if data_file is None or not data_file.is_file() or data_file.stat().st_size == 0:
        os.replace(staging / path.name, path)
        return None
    os.replace(data_file, path.parent / data_name)
    try:
        os.replace(staging / path.name, path)
    except BaseException:
        (path.parent / data_name).unlink(missing_ok=True)
        raise
    return data_name


def _check_external_sources(model: ir.Model, path: Path) -> None:
    """Every tensor still on disk, functions and subgraphs included, passes the load check
    from its own folder: an absolute or escaping location is never read into, nor kept in,
    an output (the ONNX checker, which would also catch it, can be skipped)."""
    for tensor in external_tensors(model):
        problem = _location_problem(tensor, Path(tensor.base_dir or "."))
        if problem is not None:
            raise ModelSaveError(f"{path}: {problem}")


def _fresh_data_name(path: Path) -> str:
    """A data-file name for ``path`` that no file beside it has."""
    while True:
        name = f"{path.name}.{secrets.token_hex(DATA_NAME_HEX_BYTES)}.data"
        if not (path.parent / name).exists():
            return name


def _data_files_written_for(path: Path) -> set[str]:
    """The data files the model now at ``path`` reads that qgraph wrote for it: what a new
    write there leaves stale. Whatever that model says, only qgraph's names count: a per-write
    ``<name>.<8 hex digits>.data``, or ``<name>.data`` (its name before those) when the model
    carries qgraph's version stamp. No other file is ever taken for one."""
    fresh = re.compile(re.escape(path.name) + rf"\.[0-9a-f]{{{2 * DATA_NAME_HEX_BYTES}}}\.data")
    plain = f"{path.name}.data"
    names = {f.name for f in path.parent.iterdir()} if path.is_file() else set()
    if not any(fresh.fullmatch(name) or name == plain for name in names):
        return set()
    try:
        previous = ir.serde.deserialize_model(onnx.load_model(path, load_external_data=False))
    except Exception:  # not a model onnx_ir reads, so not one that reads a data file
        return set()
    stamped = VERSION_METADATA_KEY in previous.metadata_props
    return {
        tensor.location
        for tensor in external_tensors(previous)
        if fresh.fullmatch(tensor.location) or (stamped and tensor.location == plain)
    }


def _remove_stale(names: set[str], folder: Path, protected: Inputs) -> None:
    for name in sorted(names):
        stale = folder / name
        if any(same_file(stale, file) for file in protected):
            continue
        try:
            stale.unlink(missing_ok=True)
        except OSError as error:
            logger.warning("%s: stale data file not removed (%s)", stale, error.strerror)


@contextlib.contextmanager
def _ort_ir_version(model: ir.Model) -> Iterator[None]:
    """Stamp the lowest IR version the opsets need (never less than the model had), <= 13."""
    original = model.ir_version
    opsets = [onnx.helper.make_opsetid(domain, v) for domain, v in model.opset_imports.items()]
    needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model.ir_version = min(MAX_ORT_IR_VERSION, max(original, needed))
    try:
        yield
    finally:
        model.ir_version = original


@contextlib.contextmanager
def _external_tensors_inlined(model: ir.Model) -> Iterator[None]:
    """Temporarily hold external tensors (functions and subgraphs included) in memory, so they
    serialize into the file."""
    restore = [
        (owner, tensor)
        for owner, tensor in _tensor_slots(model)
        if isinstance(tensor, ir.ExternalTensor)
    ]
    for owner, tensor in restore:
        _put_tensor(owner, _in_memory(tensor))
    try:
        yield
    finally:
        for owner, tensor in restore:
            _put_tensor(owner, tensor)


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


def serialize(model: ir.Model) -> bytes:
    """``model`` as one in-memory ONNX file that onnxruntime loads (external data inlined).

    Only for models that fit a single protobuf; use ``save`` for larger ones.
    """
    with _ort_ir_version(model), _external_tensors_inlined(model):
        return ir.serde.serialize_model(model).SerializeToString()
