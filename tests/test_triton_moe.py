"""The Triton grouped GEMM (triton_moe.grouped_mm) against a plain-torch loop over the experts, in float32.

On the CPU it runs in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 there) at tiny sizes in fp32,
tolerance 1e-4: the interpreter's tl.dot multiplies bf16 operands wrongly (it holds bf16 as uint16 and multiplies
the bit patterns: errors ~1e10), so bf16 is checked on the GPU only, against the fp32 reference over the same bf16
inputs (relative error < 1e-2, as in test_triton_kernels.py).

Both kernels run everywhere: the pointer kernel (tma=False) and the persistent TMA one (tma=True; the interpreter
runs tensor descriptors too, with 3 programs looping over the tiles). On a CUDA device before Hopper tma=True is
skipped.
"""
import pytest
import torch

from conftest import gpu

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
TOL = 1e-2 if ON_GPU else 1e-4
HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] >= 9
TMA = [False, pytest.param(True, marks=pytest.mark.skipif(ON_GPU and not HOPPER, reason="TMA needs Hopper"))]

# rows per expert, then unused trailing rows (offs[-1] < M); the empty experts sit between others and at the ends
CASES = {
    "mixed": ([10, 0, 1, 29], 5),  # M = 45: not a multiple of 16 or 32; expert 3 spans several tiles
    "empty_ends": ([0, 17, 0, 1], 3),
    "one_expert": ([0, 0, 33, 0], 0),
    "all_empty": ([0, 0, 0, 0], 6),
}
# block_m, block_n, block_k, group_m: several m- and n-tiles; N = 48 is not a multiple of 32, K = 48 not of 32
BLOCKS = {"16x32x32_g2": (16, 32, 32, 2), "16x16x16_g1": (16, 16, 16, 1), "32x64x32_g3": (32, 64, 32, 3),
          "defaults": (128, 128, 64, 8)}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make(counts, trailing, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    m = sum(counts) + trailing
    x = torch.randn(m, k, generator=g).to(DTYPE).to(DEVICE)
    # distinct experts: each its own random weights, scaled apart so that a swapped expert shows at any tolerance
    w = (torch.randn(len(counts), n, k, generator=g) * torch.arange(1, len(counts) + 1)[:, None, None])
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    return x, w.to(DTYPE).to(DEVICE), offs


def reference(x, w, counts):
    """Expert e's rows times w[e].T in float32, expert by expert."""
    out, start = [], 0
    for e, c in enumerate(counts):
        out.append(torch.mm(x[start:start + c].float(), w[e].float().T))
        start += c
    return torch.cat(out)


def swiglu(h):
    """silu(gate) * up of products [rows, 2 I] whose columns are gate, then up."""
    i = h.shape[1] // 2
    return torch.nn.functional.silu(h[:, :i]) * h[:, i:]


def check(got, x, w, counts, activation=lambda h: h):
    expect = activation(reference(x, w, counts))
    start = 0
    for e, c in enumerate(counts):  # expert by expert, so that one wrong expert (or one wrong row) can't hide
        if c:
            assert rel_err(got[start:start + c], expect[start:start + c]) < TOL, f"expert {e}"
        start += c
    assert got[start:].isnan().all(), "rows past offs[-1] must be left untouched"


@pytest.mark.parametrize("tma", TMA)
@pytest.mark.parametrize("blocks", sorted(BLOCKS))
@pytest.mark.parametrize("nk", [(48, 64), (64, 32), (48, 48)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_mm_matches_reference(case, nk, blocks, tma):
    from nanoflow.kernels.triton_moe import grouped_mm
    counts, trailing = CASES[case]
    n, k = nk
    bm, bn, bk, gm = BLOCKS[blocks]
    x, w, offs = make(counts, trailing, n, k, seed=hash((case, nk)) % 1000)
    out = torch.full((x.shape[0], n), float("nan"), dtype=DTYPE, device=DEVICE)
    got = grouped_mm(x, w, offs, out, block_m=bm, block_n=bn, block_k=bk, group_m=gm, num_warps=4, num_stages=2,
                     tma=tma)
    assert got is out
    check(got, x, w, counts)


# the interpreter's numpy: the sigmoid of a very negative sum overflows exp to inf, giving the right 0
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("tma", TMA)
@pytest.mark.parametrize("blocks", ["16x32x32_g2", "32x64x32_g3", "defaults"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_mm_gated_matches_reference(case, blocks, tma):
    """gated=True over gate and up rows interleaved (triton_moe.interleave): silu(gate) * up of each expert's rows,
    from the fp32 sums, into half the columns. I = 48 is not a multiple of the tiles' half widths."""
    from nanoflow.kernels.triton_moe import grouped_mm, interleave
    counts, trailing = CASES[case]
    bm, bn, bk, gm = BLOCKS[blocks]
    x, w, offs = make(counts, trailing, 96, 64, seed=hash(case) % 1000)
    out = torch.full((x.shape[0], 48), float("nan"), dtype=DTYPE, device=DEVICE)
    got = grouped_mm(x, interleave(w), offs, out, block_m=bm, block_n=bn, block_k=bk, group_m=gm, num_warps=4,
                     num_stages=2, tma=tma, gated=True)
    assert got is out
    check(got, x, w, counts, swiglu)
    assert grouped_mm(x, interleave(w), offs, tma=tma, gated=True).shape == (x.shape[0], 48)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("tma", TMA)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bm, pad", [(16, 16), (16, 32), (32, 32)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_mm_padded_layout(case, bm, pad, gated, tma):
    """pad > 1, moe_route's padded slots: each expert's rows start at a multiple of pad, the gap after them zero
    rows. Each expert's rows equal the reference; its last m-tile is stored whole, so the gap's rows in it come out
    zero (zero rows times w; silu(0) * 0 when gated: down then multiplies zeros too); rows that no tile covers (the
    rest of a gap wider than a tile, the trailing rows) are left untouched."""
    from nanoflow.kernels.triton_moe import grouped_mm, interleave
    counts, trailing = CASES[case]
    n, k = 64, 48
    g = torch.Generator().manual_seed(hash((case, bm, pad)) % 1000)
    padded = [-(-c // pad) * pad for c in counts]
    firsts = [sum(padded[:e]) for e in range(len(counts))]
    x = torch.zeros(sum(padded) + trailing, k)
    for f, c in zip(firsts, counts):
        x[f:f + c] = torch.randn(c, k, generator=g)
    w = torch.randn(len(counts), n, k, generator=g) * torch.arange(1, len(counts) + 1)[:, None, None]
    x, w = x.to(DTYPE).to(DEVICE), w.to(DTYPE).to(DEVICE)
    offs = torch.tensor([f + c for f, c in zip(firsts, counts)], dtype=torch.int32, device=DEVICE)
    width = n // 2 if gated else n
    out = torch.full((x.shape[0], width), float("nan"), dtype=DTYPE, device=DEVICE)
    grouped_mm(x, interleave(w) if gated else w, offs, out, block_m=bm, block_n=32, block_k=32, group_m=2,
               num_warps=4, num_stages=2, tma=tma, gated=gated, pad=pad)
    covered = torch.zeros(x.shape[0], dtype=torch.bool)
    for e, (f, c) in enumerate(zip(firsts, counts)):
        if c:
            expect = torch.mm(x[f:f + c].float(), w[e].float().T)
            assert rel_err(out[f:f + c], swiglu(expect) if gated else expect) < TOL, f"expert {e}"
        end = f + -(-c // bm) * bm
        assert (out[f + c:end] == 0).all(), f"expert {e}: its last tile's gap rows"
        covered[f:end] = True
    assert out[~covered.to(DEVICE)].isnan().all(), "rows no tile covers must be left untouched"


@pytest.mark.parametrize("tma", TMA)
def test_grouped_mm_allocates_out_and_takes_strided_rows(tma):
    """Without out it allocates [M, N] in x's dtype; x may be a view with a row stride wider than K."""
    from nanoflow.kernels.triton_moe import grouped_mm
    counts = [3, 0, 20, 6]
    x, w, offs = make(counts, 0, 48, 64, seed=7)
    wide = torch.randn(x.shape[0], 96).to(DTYPE).to(DEVICE)
    wide[:, 16:80] = x
    got = grouped_mm(wide[:, 16:80], w, offs, block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2,
                     tma=tma)
    assert got.shape == (x.shape[0], 48) and got.dtype == DTYPE
    check(got, x, w, counts)


def test_grouped_mm_tma_needs_aligned_rows():
    """K = 6 (24 or 12 bytes a row): tma=None falls back to the pointer kernel, tma=True refuses."""
    from nanoflow.kernels.triton_moe import grouped_mm
    counts = [3, 0, 20, 6]
    x, w, offs = make(counts, 2, 48, 6, seed=5)
    out = torch.full((x.shape[0], 48), float("nan"), dtype=DTYPE, device=DEVICE)
    check(grouped_mm(x, w, offs, out, block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2), x, w, counts)
    with pytest.raises(ValueError, match="tma=True"):
        grouped_mm(x, w, offs, out, block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2, tma=True)


def programs() -> int:
    """How many programs the TMA kernel runs: one an SM on a GPU, INTERPRETER_PROGRAMS in the interpreter."""
    from nanoflow.kernels import sm_share, triton_moe
    return sm_share.total_sms(0) if ON_GPU else triton_moe.INTERPRETER_PROGRAMS


# tiles (16 x 32) as a function of the programs P, K (k-blocks of 16), the fewest k-blocks cut (SPLIT_MIN_K_ITERS)
# and whether it is cut: a last round of fewer tiles than the programs, cut by k-iterations (2 or more a chunk, so
# that the sums' order changes), after whole rounds (17 k-blocks: 6 chunks, the last short) or alone; one that
# cannot be cut (one k-block); and one whose tiles are too short to be cut (17 k-blocks, 18 at least)
SPLITS = {"part_round": (lambda p: 2 * p + 1, 272, 2, True),
          "quarter_round": (lambda p: p + max(p // 4, 1), 128, 2, True),
          "one_tile": (lambda p: 1, 256, 2, True), "one_k_block": (lambda p: p + 1, 16, 1, False),
          "short_tiles": (lambda p: 2 * p + 1, 272, 18, False)}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.skipif(ON_GPU and not HOPPER, reason="TMA needs Hopper")
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", sorted(SPLITS))
def test_grouped_mm_split_round_matches_reference(case, gated, monkeypatch):
    """The TMA kernel's part round cut by k-iterations (split_k) equals the reference, twice the same bits (a cut
    tile's pieces are added in chunk order, whichever program completes it), and whether it was cut: in the
    interpreter's fp32 outputs a cut tile's sums differ in their last bits from the uncut kernel's. (A GPU's bf16
    outputs round such differences away.)"""
    from nanoflow.kernels import triton_moe
    from nanoflow.kernels.triton_moe import grouped_mm, interleave
    monkeypatch.setattr(triton_moe, "INTERPRETER_PROGRAMS", 8)  # part rounds of several tiles, each cut 3-5 ways
    tiles, k, min_k_iters, cut = SPLITS[case]
    monkeypatch.setattr(triton_moe, "SPLIT_MIN_K_ITERS", min_k_iters)
    t = tiles(programs())
    counts = [0, 5, 0, 0] if t == 1 else [16 * (t - 2) - 5, 0, 3, 16]  # one n-tile (N = 32): t m-tiles
    x, w, offs = make(counts, 2, 32, k, seed=hash(case) % 1000)
    outs = []
    for split_k in (8, 8, 1):
        outs.append(torch.full((x.shape[0], 16 if gated else 32), float("nan"), dtype=DTYPE, device=DEVICE))
        grouped_mm(x, interleave(w) if gated else w, offs, outs[-1], block_m=16, block_n=32, block_k=16,
                   num_warps=4, num_stages=2, tma=True, gated=gated, split_k=split_k)
        check(outs[-1], x, w, counts, swiglu if gated else (lambda h: h))
    rows = sum(counts)
    assert torch.equal(outs[0][:rows], outs[1][:rows])
    if not ON_GPU:
        assert torch.equal(outs[0][:rows], outs[2][:rows]) != cut


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.skipif(ON_GPU and not HOPPER, reason="TMA needs Hopper")
@pytest.mark.parametrize("share", [5, 2])
def test_grouped_mm_runs_one_program_an_sm_of_the_units_share(share, monkeypatch):
    """Issued for an execution unit (sm_share.current set, as the pipeline sets it), the persistent kernel runs one
    program per SM of the share, not of the device (those past the share would wait for a whole first wave), and
    its part round, cut among that many programs, still equals the reference."""
    from nanoflow.kernels import sm_share, triton_moe
    from nanoflow.kernels.triton_moe import grouped_mm
    monkeypatch.setattr(triton_moe, "SPLIT_MIN_K_ITERS", 2)
    monkeypatch.setattr(sm_share, "current", share)
    grids = []

    class Spy:  # records the launch grid, then launches
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]
    kernel = triton_moe._grouped_mm_tma_kernel
    monkeypatch.setattr(triton_moe, "_grouped_mm_tma_kernel", Spy())
    counts = [16 * (2 * share - 1) - 5, 0, 3, 16]  # one n-tile: 2 * share + 1 m-tiles, a part round of one
    x, w, offs = make(counts, 2, 32, 272, seed=share)
    out = torch.full((x.shape[0], 32), float("nan"), dtype=DTYPE, device=DEVICE)
    grouped_mm(x, w, offs, out, block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2, tma=True)
    check(out, x, w, counts)
    assert grids == [(share,)]


@gpu
@pytest.mark.parametrize("path", ["pointer", "tma", "tma_unflattened", "tma_gated", "tma_uncut",
                                  "pointer_gated"])
def test_grouped_mm_in_a_cuda_graph_follows_new_offsets(path, monkeypatch):
    """No host sync: captured once, it follows offsets rewritten in place before each replay."""
    if path.startswith("tma") and not HOPPER:
        pytest.skip("TMA needs Hopper")
    from nanoflow.kernels import triton_moe
    from nanoflow.kernels.triton_moe import grouped_mm, interleave
    monkeypatch.setattr(triton_moe, "SPLIT_MIN_K_ITERS", 1)  # K's 8 k-blocks: the part round cut, as at full size
    counts = [5, 0, 37, 0, 0, 130, 1, 0]
    x, w, offs = make(counts, 40, 256, 512, seed=11)
    gated = path.endswith("gated")
    out = torch.full((x.shape[0], 128 if gated else 256), float("nan"), dtype=DTYPE, device=DEVICE)
    kw = dict(tma=path.startswith("tma"), flatten=path != "tma_unflattened", gated=gated,
              split_k=1 if path == "tma_uncut" else 8)
    activation = swiglu if gated else (lambda h: h)
    w_in = interleave(w) if gated else w
    grouped_mm(x, w_in, offs, out, **kw)  # warm-up: compiles
    check(out, x, w, counts, activation)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped_mm(x, w_in, offs, out, **kw)
    for moved in ([0, 100, 0, 72, 0, 0, 0, 1], [213, 0, 0, 0, 0, 0, 0, 0], [0] * 8):
        out.fill_(float("nan"))
        offs.copy_(torch.tensor(moved).cumsum(0).to(torch.int32))
        graph.replay()
        check(out, x, w, moved, activation)


def allocated_bytes(fn, *inputs):
    """fn(*inputs) and the bytes of every storage its torch ops allocated on the inputs' device: an op's outputs that
    alias none of its arguments (not views, in-place results, or the interpreter's views of existing storages). All
    of fn's allocations there, so a bound on its peak; counted op by op, since an allocator reuses a freed block's
    address. (Not the host's copies, e.g. of the offsets read back.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    total = [0]

    def ptr(a):
        return a.untyped_storage().data_ptr() if isinstance(a, torch.Tensor) else a.data_ptr()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {ptr(a) for a in tree_leaves((args, kwargs)) if isinstance(a, (torch.Tensor, torch.UntypedStorage,
                                                                                   torch.TypedStorage))}
            total[0] += sum(t.untyped_storage().nbytes() for t in tree_leaves(out)
                            if isinstance(t, torch.Tensor) and t.device == inputs[0].device and ptr(t) not in given)
            return out
    with Count():
        result = fn(*inputs)
    return result, total[0]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.skipif(ON_GPU and not HOPPER, reason="TMA needs Hopper")
@pytest.mark.parametrize("path", ["triton", "reference"])
def test_experts_mlp_allocates_what_its_scratch_counts(path, monkeypatch):
    """The engine reserves experts_scratch's bytes for the experts' op (Workspace.bytes_for, before sizing the KV
    cache): every allocation of experts_mlp fits in it. Triton's, with both GEMMs' split-K scratch, takes exactly
    its count (no gate|up product: the reserve is not counting one)."""
    from nanoflow.kernels import reference as ref
    from nanoflow.kernels import sm_share, tma, triton_moe
    counts, h, i = [40, 0, 3, 77], 64, 48
    x, gate_up, offs = make(counts, 0, 2 * i, h, seed=5)
    down = make(counts, 0, h, i, seed=6)[1]
    if path == "reference":
        y, used = allocated_bytes(ref.experts_mlp, x, gate_up, down, offs)
        assert used <= ref.experts_scratch(len(x), h, i, DTYPE)
    else:
        monkeypatch.setattr(triton_moe, "SPLIT_MIN_K_ITERS", 1)
        monkeypatch.setattr(tma, "available", lambda t: True)  # the TMA kernel in the interpreter too
        monkeypatch.setattr(sm_share, "current", 2)  # two programs, on the GPU as in the interpreter
        y, used = allocated_bytes(triton_moe.experts_mlp, x, triton_moe.interleave(gate_up), down, offs)
        assert used == triton_moe.scratch_bytes(len(x), h, i, DTYPE, programs=2)
    start = 0
    for e, c in enumerate(counts):
        if c:
            act = swiglu(x[start:start + c].float() @ gate_up[e].float().T)
            assert rel_err(y[start:start + c], act @ down[e].float().T) < TOL, f"expert {e}"
        start += c


@pytest.mark.parametrize("pad", [1, 16])
@pytest.mark.parametrize("m, e, k, normalize", [(1, 8, 2, True), (37, 8, 2, True), (600, 8, 2, True),
                                                (150, 60, 4, False), (1100, 60, 4, False), (0, 8, 2, True),
                                                (9, 4, 4, True)])
def test_route_matches_reference(m, e, k, normalize, pad):
    """The Triton routing against reference.moe_route: Mixtral's 8 experts top-2 renormalized, in one and in ten
    blocks of rows (64 at 8 experts); Qwen2-MoE's 60 top-4 not renormalized, in ten blocks of 16 rows and in 35 of
    32 (at most 64 blocks: larger blocks as the rows grow); no rows; k = E; each expert's pairs packed or from a
    multiple of 16 slots on.
    Logits in the router's dtype, each row a random order of distinct values (bf16 logits tie often, and
    torch.topk's tie-break is its own: the next test)."""
    from nanoflow.kernels import reference
    from nanoflow.kernels.triton_moe import route
    g = torch.Generator().manual_seed(m * 100 + e)
    ranks = torch.rand(m, e, generator=g).argsort(-1)
    logits = ((ranks - e / 2) * 0.125 + torch.randint(-4, 4, (m, 1), generator=g)).to(torch.bfloat16).to(DEVICE)
    got, expect = route(logits, k, normalize, pad=pad), reference.moe_route(logits, k, normalize, pad=pad)
    for name, a, b in zip(("rows", "where", "weights", "offs"), got, expect):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name == "weights":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("pad", [1, 16])
@pytest.mark.parametrize("m, live, first", [(600, 517, 0), (600, 300, 100), (600, 900, 100), (64, 10, 32),
                                             (37, 0, 0)])
def test_route_skips_padding_rows(m, live, first, pad):
    """A CUDA graph's bucket: the rows from `live` (counted from the op's first row) are padding and go to no
    expert. Triton and the reference agree on every output; the real rows route as if the padding were not
    there; the padding's places are 0 with weight 0, and the slots past the placed pairs hold -1 (no row)."""
    from nanoflow.kernels import reference
    from nanoflow.kernels.triton_moe import route
    e, k = 8, 2
    g = torch.Generator().manual_seed(m + live)
    logits = (torch.rand(m, e, generator=g).argsort(-1) * 0.125).to(torch.bfloat16).to(DEVICE)
    logits[m // 2:] = float("nan")  # padding holds whatever was there; where it is real, no NaN reaches here
    n = min(max(live - first, 0), m)
    logits[:n] = (torch.rand(n, e, generator=g).argsort(-1) * 0.125).to(torch.bfloat16).to(DEVICE)
    count = torch.tensor([live], dtype=torch.int32, device=DEVICE)
    got = route(logits, k, True, count, first, pad)
    expect = reference.moe_route(logits, k, True, count, first, pad)
    for name, a, b in zip(("rows", "where", "weights", "offs"), got, expect):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    rows, where, weights, offs = got
    real = reference.moe_route(logits[:n], k, True, pad=pad)
    assert torch.equal(offs, real[3]) and (rows >= 0).sum().item() == n * k
    assert torch.equal(rows[:len(real[0])], real[0]) and (rows[len(real[0]):] == -1).all()
    assert torch.equal(where[:n], real[1]) and not where[n:].any()
    torch.testing.assert_close(weights[:n], real[2])
    assert not weights[n:].any()


def test_route_ties_go_to_the_lower_expert():
    """Equal logits: the top-k takes the lowest experts among equals, and the pairs stay a permutation that
    rows and where describe alike."""
    from nanoflow.kernels.triton_moe import route
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]],
                          dtype=torch.bfloat16, device=DEVICE)
    rows, where, weights, offs = route(logits, 2, True)
    assert offs.tolist() == [2, 5, 6, 6]  # rows 0 and 2 take experts 0 and 1, row 1 takes 1 and 2
    assert rows.tolist() == [0, 2, 0, 1, 2, 1]
    assert where.tolist() == [[0, 2], [3, 5], [1, 4]]
    assert torch.equal(rows[where], torch.arange(3, device=DEVICE)[:, None].expand(3, 2))
    torch.testing.assert_close(weights, torch.full((3, 2), 0.5, device=DEVICE))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN rows
def test_route_places_every_pair_of_rows_that_are_not_numbers():
    """A CUDA graph's padding rows hold whatever the workspace held: a row of NaN or infinities still picks k
    experts, so that every pair gets a place (else the combine reads a place never written)."""
    from nanoflow.kernels.triton_moe import route
    logits = torch.randn(70, 8).to(torch.bfloat16)
    logits[3] = float("nan")
    logits[5, 2] = float("nan")
    logits[66] = float("inf")
    logits[67, :2] = float("-inf")
    rows, where, _, offs = route(logits.to(DEVICE), 2, True)
    assert offs[-1].item() == 140 and (torch.diff(offs, prepend=offs.new_zeros(1)) >= 0).all()
    assert sorted(where.flatten().tolist()) == list(range(140))
    assert torch.equal(rows[where], torch.arange(70, device=DEVICE)[:, None].expand(70, 2))
