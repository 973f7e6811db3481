"""The one walk over a functional Keras graph, nested models inlined.

Every tfkdp pass that looks at a model's graph starts here: the channel
analysis (`tfkdp.pruning.analysis`), MAC counting (`tfkdp.metrics`) and the
rebuild engine (`tfkdp.pruning.rebuild`, which re-creates each nested model
in the `ordered_nodes` order of this module).

`FlatGraph(model)` lists every call of every leaf layer (or `keras.ops`
operation) as a `FlatNode`, in the order Keras executes them. A nested
functional or sequential model is walked through: its layers appear with
paths `"outer/inner"`, and a nested model called twice is walked twice (its
second walk has its own tensor keys). Tensors are identified by keys
`(tag, id(tensor))`, where `tag` names the nested-model call; a nested
model's input and output tensors are aliased to the outer tensors they stand
for, so `FlatGraph.key` resolves any tensor to one key.
"""

import collections

import keras

__all__ = ["FlatNode", "FlatGraph", "graph_of", "ordered_nodes", "is_nested_model"]


class FlatNode:
    """One call of a leaf layer or operation.

    Attributes:
        path: the layer's path (`"outer/inner"` inside nested models).
        layer: the layer or `keras.Operation`.
        node: the Keras `Node` of the call.
        inputs: tensor keys of the call's inputs (`node.input_tensors` order).
        outputs: tensor keys of its outputs.
        tag: the nested-model call the node belongs to (`""` at top level).
        prefix: the path prefix of that nested model (`""` at top level).
    """

    __slots__ = ("path", "layer", "node", "inputs", "outputs", "tag", "prefix")

    def __init__(self, path, layer, node, inputs, outputs, tag, prefix):
        self.path = path
        self.layer = layer
        self.node = node
        self.inputs = inputs
        self.outputs = outputs
        self.tag = tag
        self.prefix = prefix


def graph_of(model):
    """The Functional graph of a functional or built sequential model, else None."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional):
        return model
    return None


def ordered_nodes(graph):
    """Nodes of a Functional graph in the order Keras executes them (by
    decreasing depth); this is the "graph order" of group ids."""
    ordered = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        ordered.extend(graph._nodes_by_depth[depth])
    return ordered


def is_nested_model(op):
    """True for a functional or built sequential model used as a layer."""
    return isinstance(op, keras.Model) and graph_of(op) is not None


class FlatGraph:
    """Every leaf call of a functional model, nested models inlined.

    Args:
        model: a functional or built sequential `keras.Model`.

    Attributes:
        nodes: the `FlatNode`s in execution order.
        shapes: `{tensor key: shape}`.
        producer_of: `{tensor key: FlatNode}` of the call that made each tensor.
        consumers: `{tensor key: number of calls reading it}`.
        input_keys: keys of the top-level model's inputs.
        inputs: `[(key, input layer name, shape)]` of the top-level inputs.
        output_keys: keys of every (nested or top-level) model output.
        top_outputs: keys of the top-level model's outputs.
        first_tag: `{nested model path: tag of its first call}`.

    Raises:
        ValueError: if `model` has no functional graph (a subclassed model).
    """

    def __init__(self, model):
        graph = graph_of(model)
        if graph is None:
            cls = type(model)
            raise ValueError(
                f"graph analysis needs a functional or built Sequential keras.Model; received "
                f"{cls.__module__}.{cls.__qualname__} {getattr(model, 'name', model)!r}. "
                "Subclassed models have no inspectable graph: rebuild them with the functional API."
            )
        self.nodes = []
        self.alias = {}
        self.shapes = {}
        self.producer_of = {}
        self.consumers = collections.Counter()
        self.output_keys = set()
        self.first_tag = {"": ""}
        self.input_keys = []
        self.inputs = []
        self._calls = collections.Counter()
        self._walk(model, "", "", None)
        self.top_outputs = [self.key("", t) for t in graph.outputs]

    def key(self, tag, tensor):
        """The key of `tensor` seen from the nested-model call `tag`, aliases resolved."""
        k = (tag, id(tensor))
        while k in self.alias:
            k = self.alias[k]
        return k

    def _walk(self, model, prefix, tag, in_keys):
        graph = graph_of(model)
        if in_keys is None:
            for tensor in graph.inputs:
                key = (tag, id(tensor))
                self.input_keys.append(key)
                self.shapes[key] = tuple(tensor.shape)
                name = tensor._keras_history.operation.name
                self.inputs.append((key, name, tuple(tensor.shape)))
        else:
            for tensor, key in zip(graph.inputs, in_keys, strict=False):
                self.alias[(tag, id(tensor))] = key
        for node in ordered_nodes(graph):
            op = node.operation
            if node.is_input:
                continue
            ins = [self.key(tag, t) for t in node.input_tensors]
            for k in ins:
                self.consumers[k] += 1
            path = f"{prefix}{op.name}"
            if is_nested_model(op):
                self._calls[path] += 1
                sub_tag = f"{path}#{self._calls[path]}"
                self.first_tag.setdefault(path, sub_tag)
                outs = self._walk(op, f"{path}/", sub_tag, ins)
                for tensor, key in zip(node.outputs, outs, strict=False):
                    self.alias[(tag, id(tensor))] = key
                continue
            outs = [(tag, id(t)) for t in node.outputs]
            flat = FlatNode(path, op, node, ins, outs, tag, prefix)
            for key, tensor in zip(outs, node.outputs, strict=False):
                self.shapes[key] = tuple(tensor.shape)
                self.producer_of[key] = flat
            self.nodes.append(flat)
        outputs = [self.key(tag, t) for t in graph.outputs]
        self.output_keys.update(outputs)
        return outputs
