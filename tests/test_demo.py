"""The README's demo runs and learns."""
from carrot_zzz import demo


def test_demo_learns_above_chance(capsys):
    acc = demo.main(['--classes', '10', '--dim', '16', '--rank', '2', '--steps', '100'])
    assert acc > 0.5                       # chance is 0.1
    out = capsys.readouterr().out
    assert 'min erank/D' in out and 'step  100' in out
