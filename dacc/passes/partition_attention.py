"""Sequence parallelism. Ulysses (plan `parallel.ulysses: P`): each of P ranks runs the blocks on
1/P of the tokens; at each attention site an all-to-all turns the token shards into head shards
(every rank then attends over all tokens for H/P heads) and another turns them back. Ring
(`parallel.ring: P`): the same shards, and each attention site becomes `dacc.ring_attention`,
which passes the keys and values around the ranks and merges partial outputs by log-sum-exp
(dacc/kernels/ring.py); no head count needs to divide P. Both (USP, `ulysses: U, ring: R`): the
tokens are sharded over the U x R ranks of the "sequence" group (the two mesh dims flattened);
at each site an all-to-all over the ulysses group turns U token shards into H/U heads over U
times the tokens, ring attention over the ring group covers the rest, and an all-to-all turns
the heads back. Every rank's queries, keys and values pass through the same exchanges, so they
stay in one token order, and attention does not depend on the order of keys.

Where: every value that enters the blocks from the prologue with a sequence dim is sharded there
(`dacc.shard`), and every value that leaves the blocks for the epilogue with one is gathered
(`dacc.gather`); the prologue and epilogue run whole on every rank (position tables, patchify and
unpatchify need every token). A sequence dim is one whose size involves a query-length symbol of
a self or joint attention site (or a symbol a shape condition ties to one, as Flux's id tables).

Joint attention (Flux, SD3: `q_len = s1 + s2`): each part of a joint dim (text, then image) is
split on its own, so a rank holds its share of both and the blocks' concatenations stay in step
with position tables sharded the same way. Ulysses' exchange then hands every rank all tokens
in their original order (under USP: its group's chunks, rank after rank), the same for queries,
keys and values; attention does not depend on the order of keys, so the result is exact.
Cross-attention onto a context that is not sharded needs no
exchange. Sizes the blocks receive as integers (the token count a view splits by) are replaced by
their per-rank values.

Any token count serves: each part is padded to a multiple of the group (dacc/kernels/collectives.py
says how the pad rows are kept out of every real row), and so is a head count that Ulysses does not
divide (zero heads). A cache probe over sharded tokens reads its values with the pad rows zeroed,
so its statistics are those of one process. Blocks that reduce over the token dim other than by
attention (a softmax written by hand, a mean over tokens) cannot be split and are refused.
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.segments import segment_of
from dacc.compiler.sharding import SizeEmitter, insert_op, is_inner, redirect, repropagate, terms
from dacc.kernels.ring import default_scale
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan

aten = torch.ops.aten
PROLOGUE = "prologue"


def partition_attention(ir: ProgramIR, plan: Plan) -> PassResult:
    par = plan.parallel
    group, world = sequence_group(par.ulysses, par.ring)
    if world == 1:
        return PassResult(False, ["parallel.ulysses 1, parallel.ring 1"])
    sites = [n for n in ir.compute_nodes() if ir.info(n).role == "attention"]
    tokens = _sequence_symbols(ir, sites)
    if not tokens:
        raise DaccError(f"parallel.{group}: no self-attention site has a dynamic token count", "partition_attention",
                        f"keep the token dims dynamic in dynamic_shapes(), or set parallel.{group}: 1")
    nodes = list(ir.graph.nodes)
    first_inner = next(n for n in nodes if is_inner(ir, n))
    # the epilogue may be empty (the last block's output is the model's): gather before the output
    first_epilogue = next(n for n in nodes if segment_of(ir, n) == "epilogue" or n.op == "output")
    _refuse_token_reductions(ir, tokens, group)
    sizes = SizeEmitter(ir, first_inner, PROLOGUE)
    shard_count = 0
    for value in [n for n in nodes if n.op == "placeholder" or segment_of(ir, n) == PROLOGUE]:
        if not any(is_inner(ir, u) for u in value.users):
            continue
        val = value.meta.get("val")
        if isinstance(val, torch.SymInt):
            expr = ir.expr(val)
            if expr.free_symbols & tokens:
                local = _local_size(ir, sizes, value, expr, world)
                redirect(ir, value, local, keep=lambda u: not is_inner(ir, u))
        elif isinstance(val, torch.Tensor) and not ir.is_param(value):
            dim = _sequence_dim(ir, value, tokens)
            if dim is None:
                continue
            shard = insert_op(ir, first_inner, torch.ops.dacc.shard.default,
                              (value, dim, _parts(ir, sizes, value, dim), group, world), PROLOGUE)
            redirect(ir, value, shard, keep=lambda u: not is_inner(ir, u))
            ir.rename_gate_value(value.name, shard.name)
            shard_count += 1
    exchanged = _exchange_at_sites(ir, sites, sizes, par.ulysses, par.ring)
    probes = _zero_probe_padding(ir, sizes, tokens, group, world)
    gathered = _gather_exits(ir, first_epilogue, tokens, group, world)
    repropagate(ir, tokens, world)
    return PassResult(True, [f"{group} {world}: {shard_count} values sharded, {exchanged} attention sites "
                             f"exchanged, {probes} probe values unpadded, {gathered} values gathered; token counts "
                             f"that {world} does not divide are padded"])


def sequence_group(ulysses: int, ring: int) -> tuple[str, int]:
    """The group the token dim is sharded over, and its size: the one degree above 1, or the two
    flattened ("sequence", ulysses x ring)."""
    if ulysses > 1 and ring > 1:
        return "sequence", ulysses * ring
    return ("ulysses", ulysses) if ulysses > 1 else ("ring", ring)


def _sequence_symbols(ir: ProgramIR, sites: list[Node]) -> set[sympy.Symbol]:
    found: set[sympy.Symbol] = set()
    for node in sites:
        if not ir.info(node).detail.get("cross"):
            found |= ir.expr(node.args[0].meta["val"].shape[-2]).free_symbols
    changed = True
    while changed:  # a shape condition equating sizes ties their symbols (Flux: ids and tokens)
        changed = False
        for g in ir.guards():
            if isinstance(g, sympy.Eq):
                a, b = (x.free_symbols for x in g.args)
                for one, other in ((a, b), (b, a)):
                    if one and one <= found and not other <= found:
                        found |= other
                        changed = True
    return found


def _sequence_dim(ir: ProgramIR, value: Node, tokens: set) -> int | None:
    dims = [d for d, e in enumerate(ir.shape(value)) if e.free_symbols & tokens]
    if len(dims) > 1:
        raise DaccError(f"parallel.ulysses/ring: {value.name} ({ir.type_text(value)}) has several token dims and "
                        "cannot be sharded", "partition_attention", "set parallel.ulysses and ring to 1 for this model")
    return dims[0] if dims else None


def _part_sizes(ir: ProgramIR, value: Node, dim: int) -> list[sympy.Expr]:
    """The sizes of the parts a token dim is made of, in order: its own when it is one term, else
    those of the inputs of the concatenation that built it (found by walking back along that dim)."""
    expr = ir.expr(value.meta["val"].shape[dim])
    if len(terms(expr)) == 1:
        return [expr]
    node, d = value, dim
    for _ in range(500):
        if node.target is aten.cat.default:
            cat_dim = node.args[1] if len(node.args) > 1 else 0
            inputs = node.args[0]
            sizes = [ir.expr(i.meta["val"].shape[d]) for i in inputs]
            if cat_dim % len(ir.shape(node)) == d and all(len(terms(size)) == 1 for size in sizes):
                return sizes
        step = next(((i, k) for i in node.all_input_nodes if isinstance(i.meta.get("val"), torch.Tensor)
                     for k, e in enumerate(ir.shape(i)) if e == expr), None)
        if step is None:
            break
        node, d = step
    raise DaccError(f"parallel.ulysses/ring: cannot tell how the token dim of {value.name} ({ir.type_text(value)}) is "
                    "laid out (no concatenation of its parts found)", "partition_attention",
                    "set parallel.ulysses and ring to 1 for this model, and report it")


def _parts(ir: ProgramIR, sizes: SizeEmitter, value: Node, dim: int) -> list:
    """The full sizes of the parts of `value`'s token dim, as graph values of the prologue."""
    return [sizes.emit(p) for p in _part_sizes(ir, value, dim)]


def _local_size(ir: ProgramIR, sizes: SizeEmitter, value: Node, expr: sympy.Expr, world: int) -> Node:
    """A token count the blocks receive as an integer -> the rows each rank holds (padded)."""
    parts = terms(expr)
    with_self = [value] if len(parts) == 1 else [sizes.emit(t) for t in parts]
    local = [insert_op(ir, sizes.before, operator.floordiv,
                       (insert_op(ir, sizes.before, operator.add, (p, world - 1), sizes.segment), world), sizes.segment)
             for p in with_self]
    total = local[0]
    for p in local[1:]:
        total = insert_op(ir, sizes.before, operator.add, (total, p), sizes.segment)
    return total


def _exchange_at_sites(ir: ProgramIR, sites: list[Node], sizes: SizeEmitter, ulysses: int, ring: int) -> int:
    group = sequence_group(ulysses, ring)[0]
    sharded = {n for n in ir.graph.nodes if n.target is torch.ops.dacc.shard.default}
    touched: set[Node] = set(sharded)
    for node in ir.graph.nodes:
        if node.op == "call_function" and node not in touched and any(i in touched for i in node.all_input_nodes):
            touched.add(node)
    count = 0
    for site in sites:
        q, k, v = site.args[:3]
        flags = (q in touched, k in touched, v in touched)
        if not any(flags) or flags == (True, False, False):
            continue  # untouched, or cross-attention from local queries onto a whole context
        mask = site.args[3] if len(site.args) > 3 else site.kwargs.get("attn_mask")
        if flags != (True, True, True) or (isinstance(mask, Node) and mask in touched):
            raise DaccError(f"parallel.{group}: attention {site.name} mixes sharded and whole token sets "
                            f"({', '.join(ir.type_text(a) for a in (q, k, v))})", "partition_attention",
                            f"set parallel.{group}: 1 for this model, and report it")
        head_dim = int(q.meta["val"].shape[-1])  # an all-to-all leaves it as it is
        parts = _parts(ir, sizes, q, 2)
        if ulysses > 1:
            _ulysses_at(ir, site, ulysses, parts if ring == 1 else [])
        if ring > 1:
            _ring_at(ir, site, ring, head_dim, parts, ulysses)
        count += 1
    return count


def _ulysses_at(ir: ProgramIR, site: Node, world: int, parts: list) -> None:
    """Token shards -> head shards for q, k and v before the site, and back after it. With `parts`
    (Ulysses alone) the site sees exactly the real tokens; without (USP) the padded chunks."""
    counts = [t.meta["val"].shape[1] for t in site.args[:3]]
    heads = counts[0]
    # zero heads pad a count that `world` does not divide; grouped keys and values (fewer heads
    # than the queries) keep their grouping only when every count splits as it is
    if not all(isinstance(c, int) for c in counts) or (len(set(counts)) > 1 and any(c % world for c in counts)):
        raise DaccError(f"parallel.ulysses {world}: attention {site.name} has head counts {counts} (queries, keys, "
                        f"values): grouped heads must each be a multiple of {world}", "partition_attention",
                        f"choose a ulysses degree that divides {sorted(set(counts))}, or use parallel.ring")
    seg = ir.info(site).segment
    site.args = (*(insert_op(ir, site, torch.ops.dacc.seq_to_heads.default, (t, 1, 2, parts, "ulysses", world), seg)
                   for t in site.args[:3]), *site.args[3:])
    back = insert_op(ir, site.next, torch.ops.dacc.heads_to_seq.default, (site, 1, 2, parts, heads, "ulysses", world),
                     seg)
    redirect(ir, site, back, keep=lambda u: False)


def _ring_at(ir: ProgramIR, site: Node, world: int, head_dim: int, parts: list, chunks: int) -> None:
    """Replace the attention call by ring attention over the same (sharded) q, k, v; each block
    holds `chunks` token chunks (the ulysses degree), whose pad rows it skips."""
    q, k, v = site.args[:3]
    kwargs = dict(zip(("attn_mask", "dropout_p", "is_causal"), site.args[3:6]), **site.kwargs)
    unsupported = {name: value for name, value in kwargs.items()
                   if (name, value) not in (("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False),
                                            ("enable_gqa", False)) and name != "scale"}
    if unsupported:
        raise DaccError(f"parallel.ring: attention {site.name} uses {unsupported}, which ring attention does not "
                        "support yet", "partition_attention", "use parallel.ulysses for this model")
    scale = kwargs.get("scale")
    scale = float(scale) if scale is not None else default_scale(head_dim)
    with ir.graph.inserting_after(site):
        ring = ir.graph.call_function(torch.ops.dacc.ring_attention.default,
                                      (q, k, v, scale, "ring", world, parts, chunks))
    ring.meta = dict(site.meta)
    ir.set_info(ring, ir.info(site))  # still the attention site (role, heads, lengths) of its block
    ir.replace_node(site, ring)


def _gather_exits(ir: ProgramIR, first_epilogue: Node, tokens: set, group: str, world: int) -> int:
    count = 0
    outputs = next(n for n in reversed(ir.graph.nodes) if n.op == "output")
    sizes = SizeEmitter(ir, first_epilogue, "epilogue")
    for value in [n for n in ir.graph.nodes if is_inner(ir, n)]:
        leaving = [u for u in value.users if u is outputs or (u.op == "call_function" and not is_inner(ir, u))]
        if not leaving or not isinstance(value.meta.get("val"), torch.Tensor):
            continue
        dim = _sequence_dim(ir, value, tokens)
        if dim is None:
            continue
        part_nodes = [sizes.emit(p) for p in _part_sizes(ir, value, dim)]
        gather = insert_op(ir, first_epilogue, torch.ops.dacc.gather.default, (value, dim, part_nodes, group, world),
                           "epilogue")
        redirect(ir, value, gather, keep=lambda u: u not in leaving)
        count += 1
    return count


def _zero_probe_padding(ir: ProgramIR, sizes: SizeEmitter, tokens: set, group: str, world: int) -> int:
    """The cache probe reads its sharded values with their pad rows zeroed (a side copy; the
    blocks keep reading the values themselves)."""
    nodes = {n.name: n for n in ir.graph.nodes}
    count = 0
    for names in [names for gate in ir.cache_gates for names in (gate.probe_values, gate.probe_base)]:
        for i, name in enumerate(names):
            value = nodes[name]
            dim = _sequence_dim(ir, value, tokens) if is_inner(ir, value) else None
            if dim is None:
                continue
            zeroed = insert_op(ir, value.next, torch.ops.dacc.zero_padding.default,
                               (value, dim, _parts(ir, sizes, value, dim), group, world), ir.info(value).segment)
            names[i] = zeroed.name
            count += 1
    return count


_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten._softmax.default,
               aten._log_softmax.default, aten.softmax.int, aten.log_softmax.int, aten.var.correction,
               aten.var_mean.correction, aten.logsumexp.default, aten.cumsum.default, aten.max.dim, aten.min.dim,
               aten.sort.default, aten.topk.default, aten.argmax.default, aten.argmin.default, aten.std.correction}


def _refuse_token_reductions(ir: ProgramIR, tokens: set, group: str) -> None:
    """An op in a block that reduces over the token dim would see only this rank's tokens."""
    for node in ir.graph.nodes:
        if node.op != "call_function" or node.target not in _REDUCTIONS or not is_inner(ir, node):
            continue
        shape = ir.shape(node.args[0])
        if shape and any(shape[d].free_symbols & tokens for d in _reduced_dims(node, len(shape))):
            raise DaccError(f"parallel.{group}: {node.name} ({node.target}) in segment {ir.info(node).segment} "
                            f"reduces over the token dim of {ir.type_text(node.args[0])}; split over ranks it would "
                            "see only each rank's share", "partition_attention",
                            f"set parallel.{group}: 1 for this model (attention written as matmul and softmax "
                            "needs F.scaled_dot_product_attention to be split)")


def _reduced_dims(node: Node, rank: int) -> list[int]:
    """The dims a reduction reads across: its `dim` argument, or its schema's default when not
    given (None or [] mean every dim)."""
    schema = node.target._schema.arguments
    k = next(i for i, a in enumerate(schema) if a.name == "dim")
    dims = node.args[k] if len(node.args) > k else node.kwargs.get("dim", schema[k].default_value)
    if dims is None or dims == []:
        return list(range(rank))
    return [d % rank for d in ([dims] if isinstance(dims, int) else dims)]
