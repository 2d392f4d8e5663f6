"""The README's two commands are what users and CI run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_has_a_main_and_a_test_command_using_the_venv():
    main, tests = _readme_commands()
    for command in (main, tests):
        assert command.startswith("python3 -m venv .venv")
        assert "\n" not in command
    assert "pytest" in tests


def test_the_main_command_installs_the_demo_extra_and_the_tests_the_test_extra():
    # The demo's packages (psutil, tensorboard, matplotlib, tqdm) are not library dependencies.
    main, tests = _readme_commands()
    assert "-e '.[demo]'" in main and main.endswith("megatron-rollout-is demo")
    assert "-e '.[test]'" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci_lines
