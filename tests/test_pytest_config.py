"""pytest.ini's warning filters: the reference libraries' deprecation warnings are silenced, and a
DeprecationWarning raised from the project's own code (or a test's) is still reported. A pytest of
its own runs a test file under the repository's pytest.ini."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WARNS = '''
import warnings


def warn_from(module):
    """A DeprecationWarning raised from code of `module`, as its frame would give it."""
    warnings.warn_explicit(f"deprecated in {module}", DeprecationWarning, module.replace(".", "/") + ".py", 1,
                           module=module, registry={})


def test_library():
    warn_from("diffusers.schedulers.scheduling_euler_discrete")
    warn_from("transformers.models.clip.modeling_clip")
    warn_from("torch.nn.functional")
    warnings.warn_explicit("a FutureWarning", FutureWarning, "diffusers/utils/deprecation_utils.py", 1,
                           module="diffusers.utils.deprecation_utils", registry={})


def test_project():
    warn_from("evaluation.metrics")
    warn_from("sampler.loop")
    warnings.warn("deprecated in the test itself", DeprecationWarning)
'''


def test_library_deprecations_are_silenced_and_the_projects_are_reported(tmp_path):
    (tmp_path / "test_warns.py").write_text(WARNS)
    result = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pytest.ini"), "--rootdir", str(tmp_path),
                             "-p", "no:cacheprovider", str(tmp_path / "test_warns.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 3 warnings" in result.stdout, result.stdout
    for shown in ("deprecated in evaluation.metrics", "deprecated in sampler.loop", "deprecated in the test itself"):
        assert shown in result.stdout
    for hidden in ("diffusers", "transformers", "torch", "FutureWarning"):
        assert hidden not in result.stdout
