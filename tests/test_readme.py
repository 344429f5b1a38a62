"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert blocks, "README has no python example"
    code = blocks[0].replace("/tmp/", f"{tmp_path}/")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    before, after = map(float, re.findall(r"before/after: ([\d.e-]+) ([\d.e-]+)", out)[0])
    assert after > before
    metrics = re.findall(r"\{'reliability': .*\}", out)
    assert metrics and "'generalization'" in metrics[0] and "'locality'" in metrics[0]
    assert (tmp_path / "editor" / "editor.json").exists()
    assert (tmp_path / "tiny-gpt2-edited" / "model.safetensors").exists()
