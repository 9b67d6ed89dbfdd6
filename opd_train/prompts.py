"""Prompt files and prompt templates for real models."""
from __future__ import annotations

import json
import os

from .errors import UsageError


def load_jsonl(path: str, what: str) -> tuple:
    """(prompts, answers) from a JSONL file of {"prompt": str, "answer": optional} objects."""
    if not os.path.isfile(path):
        raise UsageError(f"{what}: file not found: {path}")
    prompts, answers = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{what}: {path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
                raise UsageError(f'{what}: {path}:{lineno}: expected an object with a non-empty '
                                 f'string "prompt" (and an optional "answer")')
            answer = item.get("answer")
            if answer is not None and not isinstance(answer, (str, int, float)):
                raise UsageError(f'{what}: {path}:{lineno}: "answer" must be a string or a number')
            prompts.append(item["prompt"])
            answers.append(None if answer is None else str(answer))
    if not prompts:
        raise UsageError(f"{what}: {path} holds no prompts")
    return prompts, answers


def apply_template(prompts: list, template: str, student_tokenizer, teacher_tokenizer) -> tuple:
    """(templated prompts, add_special_tokens). ``template``: "auto" (the student's chat template
    when it has one, else raw), "teacher" (the teacher's chat template: teacher-aligned prompts),
    "none" (raw), or a string with "{prompt}" in it (e.g. the teacher's own training wording)."""
    if template == "none":
        return list(prompts), True
    if "{prompt}" in template:
        return [template.replace("{prompt}", p) for p in prompts], True
    if template == "auto":
        chat = student_tokenizer if getattr(student_tokenizer, "chat_template", None) else None
    elif template == "teacher":
        chat = teacher_tokenizer
        if not getattr(chat, "chat_template", None):
            raise UsageError("--prompt-template teacher: the teacher's tokenizer has no chat template")
    else:
        raise UsageError(f"--prompt-template: expected auto, teacher, none or a string containing "
                         f"{{prompt}}, got {template!r}")
    if chat is None:
        return list(prompts), True
    return [chat.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts], False
