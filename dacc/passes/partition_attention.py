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
with position tables sharded the same way. The all-to-all then hands every rank all tokens in a
rank-major order, the same for queries, keys and values; attention does not depend on the order
of keys, so the result is exact. Cross-attention onto a context that is not sharded needs no
exchange. Sizes the blocks receive as integers (the token count a view splits by) are replaced by
their per-rank values. Token counts must split evenly (a shape condition of the program, checked
on every call); head counts are checked here.
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.segments import segment_of
from dacc.compiler.sharding import SizeEmitter, check_examples, insert_op, is_inner, redirect, repropagate, terms
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
    first_epilogue = next(n for n in nodes if segment_of(ir, n) == "epilogue")
    sizes = SizeEmitter(ir, first_inner, PROLOGUE)
    shard_count, guard_terms = 0, set()
    for value in [n for n in nodes if n.op == "placeholder" or segment_of(ir, n) == PROLOGUE]:
        if not any(is_inner(ir, u) for u in value.users):
            continue
        val = value.meta.get("val")
        if isinstance(val, torch.SymInt):
            expr = ir.expr(val)
            if expr.free_symbols & tokens:
                local = _local_size(ir, sizes, value, expr, world, guard_terms)
                redirect(ir, value, local, keep=lambda u: not is_inner(ir, u))
        elif isinstance(val, torch.Tensor) and not ir.is_param(value):
            dim = _sequence_dim(ir, value, tokens)
            if dim is None:
                continue
            parts = _part_sizes(ir, value, dim)
            guard_terms.update(parts)
            shard = insert_op(ir, first_inner, torch.ops.dacc.shard.default,
                              (value, dim, [sizes.emit(p) for p in parts], group, world), PROLOGUE)
            redirect(ir, value, shard, keep=lambda u: not is_inner(ir, u))
            ir.rename_gate_value(value.name, shard.name)
            shard_count += 1
    check_examples(ir, sorted(guard_terms, key=str), world, f"parallel.{group} {world}",
                   f"give example inputs whose token counts (text and image) are multiples of {world}")
    exchanged = _exchange_at_sites(ir, sites, par.ulysses, par.ring)
    gathered = _gather_exits(ir, first_epilogue, tokens, group, world)
    ir.partition_guards += [sympy.Eq(sympy.Mod(t, world), 0) for t in sorted(guard_terms, key=str)]
    repropagate(ir, tokens, world)
    return PassResult(True, [f"{group} {world}: {shard_count} values sharded, {exchanged} attention sites "
                             f"exchanged, {gathered} values gathered; token counts must be multiples of {world}"])


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


def _local_size(ir: ProgramIR, sizes: SizeEmitter, value: Node, expr: sympy.Expr, world: int, guard: set) -> Node:
    parts = terms(expr)
    guard.update(parts)
    with_self = [value] if len(parts) == 1 else [sizes.emit(t) for t in parts]
    local = [insert_op(ir, sizes.before, operator.floordiv, (p, world), sizes.segment) for p in with_self]
    total = local[0]
    for p in local[1:]:
        total = insert_op(ir, sizes.before, operator.add, (total, p), sizes.segment)
    return total


def _exchange_at_sites(ir: ProgramIR, sites: list[Node], ulysses: int, ring: int) -> int:
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
        if ulysses > 1:
            _ulysses_at(ir, site, ulysses)
        if ring > 1:
            _ring_at(ir, site, ring, head_dim)
        count += 1
    return count


def _ulysses_at(ir: ProgramIR, site: Node, world: int) -> None:
    """Token shards -> head shards for q, k and v before the site, and back after it."""
    for t in site.args[:3]:
        heads = t.meta["val"].shape[1]
        if not isinstance(heads, int) or heads % world:
            raise DaccError(f"parallel.ulysses {world}: attention {site.name} has {heads} heads, not a multiple "
                            f"of {world}", "partition_attention",
                            f"choose a ulysses degree that divides the head count ({heads})")
    seg = ir.info(site).segment
    site.args = (*(insert_op(ir, site, torch.ops.dacc.all_to_all.default, (t, 1, 2, "ulysses", world), seg)
                   for t in site.args[:3]), *site.args[3:])
    back = insert_op(ir, site.next, torch.ops.dacc.all_to_all.default, (site, 2, 1, "ulysses", world), seg)
    redirect(ir, site, back, keep=lambda u: False)


def _ring_at(ir: ProgramIR, site: Node, world: int, head_dim: int) -> None:
    """Replace the attention call by ring attention over the same (sharded) q, k, v."""
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
        ring = ir.graph.call_function(torch.ops.dacc.ring_attention.default, (q, k, v, scale, "ring", world))
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
