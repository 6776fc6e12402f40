"""Random paged-attention problems shared by the reference and the Triton kernel tests."""
import torch

from nanoflow.models.batch import ForwardBatch


def make_case(q_lens, seq_lens, num_decode, hq=8, hkv=2, d=16, page=4, dtype=torch.float32, device="cpu", seed=0):
    """A batch whose sequences own shuffled pages of a cache that holds random garbage elsewhere."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-n // page) for n in seq_lens)
    num_blocks = blocks_needed + 5
    kc = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-n // page))] for n in seq_lens]
    qs = [0]
    for n in q_lens:
        qs.append(qs[-1] + n)
    t = qs[-1]
    batch = ForwardBatch(torch.zeros(t, dtype=torch.long), torch.zeros(t, dtype=torch.long),
                         torch.zeros(t, dtype=torch.long), qs, seq_lens, tables, num_decode,
                         torch.zeros(1, dtype=torch.long))
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    return q.to(device), kc.to(device), vc.to(device), batch


def dense_kv(cache, table, seq_len):
    return cache[torch.tensor(table)].flatten(0, 1)[:seq_len]
