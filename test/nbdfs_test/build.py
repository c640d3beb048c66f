"""Where the tree under test is: the source directory and the build directory
($NBDFS_BUILD_DIR, else SRC/build)."""
import os


SRC_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_DIR = os.environ.get("NBDFS_BUILD_DIR", os.path.join(SRC_DIR, "build"))


def build_path(*parts):
    """Path of a built artefact (e.g. build_path('src', 'nbdfs'))."""
    return os.path.join(BUILD_DIR, *parts)
