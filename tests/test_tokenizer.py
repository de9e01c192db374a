"""The checkpoint's tokenizer and chat template, against transformers' AutoTokenizer."""

from __future__ import annotations

import pytest

from moeserve import Tokenizer

TEXTS = [
    "def f(x):\n    return x + 1",
    "caché naïve 日本語 🙂🚀",
    "<|im_start|>user\nhello<|im_end|>",
    "  leading spaces and trailing  ",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You route tokens."},
    {"role": "user", "content": "Which expert? 日本語"},
    {"role": "assistant", "content": "Expert 3."},
    {"role": "user", "content": "And now?"},
]


# mixtral: template in chat_template.jinja; olmoe: template inside tokenizer_config.json.
@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_matches_transformers(arch, checkpoints):
    from transformers import AutoTokenizer

    path = checkpoints(arch)
    ours, theirs = Tokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    for add_generation_prompt in (True, False):
        rendered = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        assert rendered == theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    assert rendered.startswith("<|im_start|>system\n")
    assert ours.eos_token_id == theirs.eos_token_id == 2
    assert ours.vocab_size == len(theirs)


def test_missing_chat_template_is_a_clear_error(checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(checkpoints("mixtral"), tmp_path / "m")
    (path / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(path).apply_chat_template(MESSAGES)
