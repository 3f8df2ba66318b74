"""Patch parallelism for a VAE decoder (plan `parallel.vae_patch: P`): each of P ranks decodes a
band of 1/P of the latent's rows, and every rank returns the whole image.

The latent is sharded along its rows on entry (`dacc.shard`) and the image gathered on exit
(`dacc.gather`); between them every op sees its band, and the ops that look beyond it are
rewritten so the stitched result is the single-process decode, not an approximation with seams:
- a convolution reading k rows around each output row gets the (k-1)/2 rows beyond each band
  edge from the neighbours (`dacc.halo`) and no longer pads rows itself; the image's own edges
  get the zero rows its padding would have added;
- GroupNorm takes its statistics over the whole image (`dacc.group_norm`: band sums all-reduced);
- attention over all pixels (the mid-block) gathers its keys and values: each rank's queries
  attend to every pixel.
Nearest upsampling and pointwise ops need nothing. Row counts stay multiples of P after every
upsampling, so only the latent's rows must split (a shape condition, checked on every call).
Convolutions that stride or dilate along rows, or change the row count, and padding modes other
than zeros are refused at compile time.
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.sharding import SizeEmitter, check_examples, insert_op, redirect, repropagate
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan

aten = torch.ops.aten
GROUP = "vae_patch"
ROWS = 2  # [B, C, H, W]: the dim bands are cut along
EDGE_PADS = {aten.reflection_pad2d.default, aten.replication_pad2d.default, aten.pad.default,
             aten.constant_pad_nd.default}


def partition_patches(ir: ProgramIR, plan: Plan) -> PassResult:
    world = plan.parallel.vae_patch
    if world == 1:
        return PassResult(False, ["parallel.vae_patch 1"])
    latent = _latent(ir)
    rows = ir.shape(latent)[ROWS]
    check_examples(ir, [rows], world, f"parallel.vae_patch {world}",
                   f"give example latents whose height is a multiple of {world}")
    nodes = list(ir.graph.nodes)
    for node in nodes:
        if node.op == "call_function" and node.target in EDGE_PADS:
            raise DaccError(f"parallel.vae_patch: {node.name} pads with {node.target}, which would pad every band's "
                            "edges, not the image's", "partition_patches", "set parallel.vae_patch: 1 for this model")
    first = next(n for n in nodes if n.op == "call_function")
    full_rows = SizeEmitter(ir, first, "prologue").emit(rows)
    shard = insert_op(ir, first, torch.ops.dacc.shard.default, (latent, ROWS, [full_rows], GROUP, world), "prologue")
    # everything else reads the band, sizes included (a view by the latent's height is by the band's)
    redirect(ir, latent, shard, keep=lambda u: u is shard or u is full_rows)
    counts = {"halo": 0, "group_norm": 0, "attention": 0}
    for node in nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.conv2d.default:
            counts["halo"] += _halo_before(ir, node, world)
        elif node.target is aten.group_norm.default:
            _group_norm(ir, node, world)
            counts["group_norm"] += 1
        elif node.target is aten.upsample_nearest2d.vec and node.args[1] is None:
            _sized_upsample(ir, node)
        elif node.target is aten.scaled_dot_product_attention.default:
            _gather_keys(ir, node, world)
            counts["attention"] += 1
    gathered = _gather_outputs(ir, world)
    ir.partition_guards.append(sympy.Eq(sympy.Mod(rows, world), 0))
    repropagate(ir, rows.free_symbols if isinstance(rows, sympy.Expr) else set(), world)
    return PassResult(True, [f"vae_patch {world}: latent rows sharded, {counts['halo']} convolutions exchange halos, "
                             f"{counts['group_norm']} GroupNorms reduce over the image, {counts['attention']} attention "
                             f"sites gather keys and values, {gathered} outputs gathered; latent height must be a "
                             f"multiple of {world}"])


def _latent(ir: ProgramIR) -> Node:
    by_name = {n.name: n for n in ir.graph.nodes if n.op == "placeholder"}
    tensors = [by_name[name] for name in ir.user_inputs if isinstance(by_name[name].meta.get("val"), torch.Tensor)]
    if len(tensors) != 1 or len(ir.shape(tensors[0])) != 4:
        shapes = ", ".join(ir.type_text(t) for t in tensors)
        raise DaccError(f"parallel.vae_patch: the model takes {shapes or 'no tensor'}; patch parallelism decodes one "
                        "image latent [batch, channels, height, width]", "partition_patches",
                        "compile the VAE decoder (a module whose forward(latents) returns vae.decode(latents)) with "
                        "vae_patch, and the transformer with the other degrees")
    return tensors[0]


def _pair(value, default: int) -> list[int]:
    if value is None:
        return [default, default]
    return list(value) * (2 if len(value) == 1 else 1) if isinstance(value, (list, tuple)) else [value, value]


def _halo_before(ir: ProgramIR, conv: Node, world: int) -> int:
    x, weight, bias, stride, padding, dilation, groups = list(conv.args) + [None] * (7 - len(conv.args))
    kernel = int(weight.meta["val"].shape[2])
    if isinstance(padding, str):  # "same" / "valid": spelled out as rows here, refused rather than guessed
        padding = [-1, -1]
    stride, padding, dilation = _pair(stride, 1), _pair(padding, 0), _pair(dilation, 1)
    if stride[0] != 1 or dilation[0] != 1 or kernel != 2 * padding[0] + 1:
        raise DaccError(f"parallel.vae_patch: convolution {conv.name} (kernel {kernel}, stride {stride[0]}, padding "
                        f"{padding[0]}, dilation {dilation[0]} along rows) does not keep a band's rows in place",
                        "partition_patches", "set parallel.vae_patch: 1 for this model")
    if padding[0] == 0:
        return 0
    seg = ir.info(conv).segment
    halo = insert_op(ir, conv, torch.ops.dacc.halo.default, (x, ROWS, padding[0], GROUP, world), seg)
    conv.args = (halo, weight, bias, stride, [0, padding[1]], dilation, 1 if groups is None else groups)
    return 1


def _sized_upsample(ir: ProgramIR, node: Node) -> None:
    """Nearest upsampling by scale factors, given its output size from its input's instead: fake
    propagation of the scale-factor form reads the sizes as integers, which would pin the band's
    height (and the batch and width) to the example's."""
    x, _, scales = node.args
    if any(float(f) != int(f) for f in scales):
        raise DaccError(f"parallel.vae_patch: {node.name} upsamples by {scales}, not whole factors", "partition_patches",
                        "set parallel.vae_patch: 1 for this model")
    seg = ir.info(node).segment
    sizes = []
    for dim, factor in zip((2, 3), scales):
        size = insert_op(ir, node, aten.sym_size.int, (x, dim), seg)
        sizes.append(insert_op(ir, node, operator.mul, (size, int(factor)), seg))
    node.target = aten.upsample_nearest2d.default  # the form whose sizes may be symbolic
    node.args = (x, sizes, None, None)


def _group_norm(ir: ProgramIR, node: Node, world: int) -> None:
    x, groups, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
    new = insert_op(ir, node, torch.ops.dacc.group_norm.default,
                    (x, groups, weight, bias, float(eps), GROUP, world), ir.info(node).segment)
    new.meta = dict(node.meta)
    ir.replace_node(node, new)


def _gather_keys(ir: ProgramIR, site: Node, world: int) -> None:
    """Keys and values of every pixel: gathered along the token dim, which is the rows (flattened
    row-major with the columns), so rank order is image order."""
    seg = ir.info(site).segment
    q, k, v = site.args[:3]
    gathered, sizes = [], SizeEmitter(ir, site, seg)  # one emitter: k and v share the size nodes
    for t in (k, v):
        full = sizes.emit(ir.shape(t)[-2])  # still the whole image's count here
        gathered.append(insert_op(ir, site, torch.ops.dacc.gather.default, (t, -2 % len(ir.shape(t)), [full],
                                                                           GROUP, world), seg))
    site.args = (q, *gathered, *site.args[3:])


def _gather_outputs(ir: ProgramIR, world: int) -> int:
    out = next(n for n in reversed(ir.graph.nodes) if n.op == "output")
    sizes = SizeEmitter(ir, out, "epilogue")
    count = 0
    for value in [a for a in out.args[0] if isinstance(a, Node)]:
        shape = ir.shape(value) or []
        if len(shape) != 4:
            continue
        gather = insert_op(ir, out, torch.ops.dacc.gather.default, (value, ROWS, [sizes.emit(shape[ROWS])], GROUP,
                                                                   world), "epilogue")
        redirect(ir, value, gather, keep=lambda u: u is not out)
        count += 1
    return count
