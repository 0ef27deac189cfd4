"""Photos that ship with the installed packages (nothing is downloaded)."""
import matplotlib.cbook


def grace_hopper() -> bytes:
    """matplotlib's sample photo grace_hopper.jpg (512 x 600), as JPEG bytes."""
    with open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as stream:
        return stream.read()
