"""Hydra over token sequences with padding: M teacher language models distilled into one GRU body with M
heads, position by position, the padding left out by the tokenizer-style attention mask (row_mask).

    python examples/sequence_distill.py [--steps 300] [--heads 4] [--device cpu|cuda]

Data: random token sequences of lengths 3 to 24, right-padded to the batch's longest with token 0. Teachers:
M small GRU language models with different random weights (a real run would load trained members). Each
step computes the teachers' next-token logits (batch, time, M, vocab) without grad and trains the student
with ``head.distill_loss(hidden, teacher_logits, T, row_mask=attention_mask)``: no indexing, no host sync.
At the end it prints the loss before and after, how far the heads agree with their own member against the
other members (a head imitates its member: each diagonal entry should be the smallest of its row), and the
heads' per-token epistemic uncertainty against the members' (``uncertainty`` on (batch, time, M, vocab)).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from tqdm import tqdm

from fasthydra import HydraHead, hydra_kl_loss, uncertainty

PAD = 0


class TinyLM(nn.Module):
    """Embedding + one GRU layer: hidden states (batch, time, width)."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=PAD)
        self.gru = nn.GRU(width, width, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gru(self.embed(tokens))[0]


def batch_of_sequences(n: int, vocab: int, gen: torch.Generator, max_len: int = 24):
    """(tokens, attention_mask), both (n, longest): random tokens 1..vocab-1, right-padded with PAD."""
    lengths = torch.randint(3, max_len + 1, (n,), generator=gen)
    longest = int(lengths.max())
    attention = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    tokens = torch.randint(1, vocab, (n, longest), generator=gen) * attention
    return tokens, attention


def train(steps: int = 300, heads: int = 4, vocab: int = 32, width: int = 48, batch: int = 32,
          temperature: float = 2.0, device: str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teachers = []
    for m in range(heads):  # M members: different random weights, and a readout each
        torch.manual_seed(seed + 1 + m)
        teachers.append(nn.Sequential(TinyLM(vocab, width), nn.Linear(width, vocab)).to(device).eval())
    torch.manual_seed(seed)
    body = TinyLM(vocab, width).to(device)
    head = HydraHead(width, vocab, heads, device=device)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=3e-3)

    def teacher_logits(tokens):
        with torch.no_grad():
            return torch.stack([t(tokens) for t in teachers], dim=2) * 3.0  # (batch, time, M, vocab), sharpened

    losses = []
    for _ in tqdm(range(steps), desc="distilling", disable=not progress):
        tokens, attention = batch_of_sequences(batch, vocab, gen)
        tokens, attention = tokens.to(device), attention.to(device)
        loss = head.distill_loss(body(tokens), teacher_logits(tokens), temperature, row_mask=attention)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    losses = torch.stack(losses).cpu()

    # Each head against each member on fresh sequences (real positions only): KL of member j from head i. The
    # ops take the (batch, time, M, vocab) logits as they are, the attention mask as the row mask.
    tokens, attention = batch_of_sequences(256, vocab, gen)
    tokens, attention = tokens.to(device), attention.to(device)
    with torch.no_grad():
        z = head(body(tokens))  # (batch, time, M, vocab)
        t = teacher_logits(tokens)
        agreement = torch.stack([
            torch.stack([hydra_kl_loss(z[..., i:i + 1, :], t[..., j:j + 1, :], temperature, row_mask=attention)
                         for j in range(heads)])
            for i in range(heads)]).cpu()
        # per-token epistemic uncertainty (the members' disagreement), (batch, time): the heads' against the
        # members' own, over the real positions
        real = attention.bool()
        mu_heads, mu_members = uncertainty(z).epistemic[real].cpu(), uncertainty(t).epistemic[real].cpu()
    return {"first_loss": losses[:10].mean().item(), "last_loss": losses[-10:].mean().item(),
            "agreement": agreement, "mu_heads": mu_heads.mean().item(), "mu_members": mu_members.mean().item(),
            "mu_correlation": torch.corrcoef(torch.stack([mu_heads, mu_members]))[0, 1].item()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    out = train(args.steps, args.heads, device=args.device)
    print(f"distillation loss: {out['first_loss']:.4f} over the first 10 steps, {out['last_loss']:.4f} over the "
          f"last 10")
    print("KL(member j || head i) on fresh sequences (rows: heads, columns: members):")
    for i, row in enumerate(out["agreement"]):
        print(f"  head {i}: " + " ".join(f"{v:7.4f}" for v in row.tolist()))
    print(f"epistemic uncertainty per token (real positions): members {out['mu_members']:.4f}, heads "
          f"{out['mu_heads']:.4f} on average; correlation across tokens {out['mu_correlation']:.3f}")


if __name__ == "__main__":
    main()
