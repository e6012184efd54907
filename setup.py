"""Installs gemma_profiles.pth next to the packages (wheel and editable installs).

The .pth file runs ``import gemma_profiles_autoload`` at interpreter start; that
module (standard library only, see docs/pth.md) reads GEMMA_PROFILE or stats the
applied-profile file and, when a profile may be wanted, leaves a finder that arms
the patch when gemma's model module is imported.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "gemma_profiles.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheelWithPth(editable_wheel):
    def _create_wheel_file(self, bdist_wheel):  # type: ignore[no-untyped-def]
        from wheel.wheelfile import WheelFile

        path = super()._create_wheel_file(bdist_wheel)
        with WheelFile(path, "a") as wheel:
            wheel.write(PTH, PTH)
        return path


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
