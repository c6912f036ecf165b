"""README's two commands: .ci/run runs the test command word for word."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / 'README.md').read_text()
    return re.findall(r'```bash\n(python -m pip install [^\n]+)\n```', text)


def test_readme_states_install_and_test_commands():
    commands = readme_commands()
    assert len(commands) >= 2, commands
    main, tests = commands[0], commands[1]
    assert main.startswith('python -m pip install . && ')
    assert 'pytest' in tests


def test_ci_runs_the_readme_test_command_word_for_word():
    ci_lines = [line for line in (ROOT / '.ci' / 'run').read_text().splitlines() if line.startswith('python')]
    assert ci_lines == [readme_commands()[1]]
