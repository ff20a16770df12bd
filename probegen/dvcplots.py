"""An HTML template for `dvc plots show` that renders with no network.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so without internet it is blank. The
template written here carries those libraries inline, taken when it is written from the installed
`vl-convert-python` package (which bundles them), so this repository holds none of their code:

    python -m probegen.dvcplots                      # writes .dvc/tmp/plots_offline.html
    dvc plots show --html-template .dvc/tmp/plots_offline.html

DVC fills a template by plain text replacement (dvc_render/html.py): `{plot_divs}` (required) becomes the
plots, `{refresh_tag}` the auto-refresh tag, `{scripts}` DVC's CDN <script> tags. This template has no
`{scripts}`, so no remote script is ever referenced; each plot div calls the global `vegaEmbed`, which the
inlined bundle defines before the plots are parsed.
"""

import argparse
import re
from pathlib import Path

from probegen.errors import ProbegenError, cli
from probegen.io import atomic_path

DEFAULT_OUTPUT = Path(".dvc/tmp/plots_offline.html")   # .dvc/tmp is git-ignored by `dvc init`
DVC_PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<!-- VERSIONS, inlined by probegen.dvcplots -->
<script>
(function () {
BUNDLE
}).call(window);
</script>
<style>
  body { font-family: sans-serif; }
  table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def _vl_convert():
    try:
        import vl_convert
    except ImportError:
        raise ProbegenError("vl-convert-python is not installed (pip install vl-convert-python): it provides "
                            "the Vega libraries that the offline plots template inlines") from None
    return vl_convert


def newest_vega_lite_5(available):
    """DVC's plot templates declare the Vega-Lite v5 schema: take the newest 5.x the package bundles."""
    fives = [v for v in available if re.fullmatch(r"5\.\d+", v)]
    if not fives:
        raise ProbegenError(f"vl-convert-python: no Vega-Lite 5.x bundled (it has {available}); "
                            "DVC's templates need Vega-Lite 5")
    return max(fives, key=lambda v: int(v.split(".")[1]))


def vega_bundle(vega_lite=None):
    """(JavaScript that defines window.vegaEmbed / vega / vegaLite, one-line version note)."""
    vlc = _vl_convert()
    available = vlc.get_vegalite_versions()
    vega_lite = vega_lite or newest_vega_lite_5(available)
    if vega_lite not in available:
        raise ProbegenError(f"--vega-lite: {vega_lite!r} is not bundled by vl-convert-python; "
                            f"known: {available}")
    note = (f"Vega {vlc.get_vega_version()}, Vega-Lite {vega_lite}, vega-embed {vlc.get_vega_embed_version()}"
            f" from vl-convert-python {vlc.__version__}")
    return vlc.javascript_bundle(vl_version=vega_lite), note


def offline_template(bundle, note):
    """The page template with `bundle` inlined; refuses a bundle that DVC's text replacement would alter."""
    for bad in (*DVC_PLACEHOLDERS, "</script"):
        if bad in bundle.lower():
            raise ProbegenError(f"Vega bundle ({note}): contains {bad!r}, which would break the page")
    # str.replace, not format: the JavaScript is full of braces.
    return PAGE.replace("VERSIONS", note).replace("BUNDLE", bundle)


def write_template(path=DEFAULT_OUTPUT, vega_lite=None):
    path = Path(path)
    if path == DEFAULT_OUTPUT and not Path(".dvc").is_dir():
        raise ProbegenError(f".dvc: no DVC project here ({Path.cwd()}); run from the project's root "
                            "or name the output file")
    bundle, note = vega_bundle(vega_lite)
    with atomic_path(path) as tmp:
        tmp.write_text(offline_template(bundle, note), encoding="utf8")
    return path, note


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m probegen.dvcplots", description=__doc__.split("\n")[0])
    parser.add_argument("output", nargs="?", default=str(DEFAULT_OUTPUT),
                        help=f"where to write the template (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--vega-lite", help="Vega-Lite version to inline (default: the newest 5.x bundled)")
    args = parser.parse_args(argv)
    path, note = write_template(args.output, args.vega_lite)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; {note})")
    print(f"render offline with: dvc plots show --html-template {path}")


if __name__ == "__main__":
    main()
