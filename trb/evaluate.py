"""Accuracy of a student on held-out problems: student-only decoding, graded with math-verify."""

from __future__ import annotations

import torch

from trb.data import render
from trb.grading import Grader
from trb.rollout import Sampler, StopSpec, rollout


def encode_prompts(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, P] ids and attention mask (chat templates carry their own special tokens)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def decode_completions(tokenizer, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Completion text per row (stop and pad tokens dropped)."""
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(tokens, mask)]


def greedy_accuracy(student, tokenizer, rows: list[dict], stop: StopSpec, grader: Grader, *,
                    prompt, max_new_tokens: int, batch: int = 100) -> dict:
    """Greedy pass@1 over `rows` (each with question and gold): accuracy, mean length, truncation rate."""
    if not rows:
        return {}
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    correct, lengths, truncated = [], [], 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        ids, mask = encode_prompts(tokenizer, [render(tokenizer, r["question"], prompt) for r in chunk], device)
        ro = rollout(student, None, ids, mask, max_new_tokens=max_new_tokens,
                     sampler=Sampler("student", greedy=True), stop=stop)
        texts = decode_completions(tokenizer, ro.tokens, ro.response_mask)
        correct += grader.grade(texts, [r["gold"] for r in chunk])
        lengths += ro.response_mask.sum(1).tolist()
        truncated += int((~ro.stopped).sum())
    student.train(was_training)
    return {"eval/accuracy": sum(correct) / len(rows), "eval/length": sum(lengths) / len(rows),
            "eval/truncated": truncated / len(rows)}
