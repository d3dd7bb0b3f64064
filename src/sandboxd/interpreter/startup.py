"""Run in every Python kernel at start: the rich result formats the e2b-code-interpreter SDK reads.

- `e2b/data`: a pandas DataFrame as a dict of columns.
- `e2b/chart`: a matplotlib Figure as chart data (the `e2b-charts` package does the extraction).
- PIL `Image.save(...)` also displays the image (patched when PIL.Image is first imported).
Registrations match by type name, so nothing heavy is imported at kernel start.
"""

from __future__ import annotations


def _install() -> None:
    import json
    from typing import Any

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter

    ip = get_ipython()
    if ip is None:
        return

    class _DictFormatter(BaseFormatter):
        """Printers keyed by (module, class name) along the MRO: lazy (nothing imported here) and
        robust to libraries that re-export classes under a public module (pandas.DataFrame)."""

        print_method = "_repr_e2b_"
        _return_type = (dict, list)

        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.by_name: dict[tuple[str, str], object] = {}

        def __call__(self, obj: object) -> object:
            for cls in type(obj).__mro__:
                printer = self.by_name.get((cls.__module__, cls.__name__))
                if printer is not None:
                    try:
                        return printer(obj)  # type: ignore[operator]
                    except Exception:
                        return None
            return None

    class _DataFormatter(_DictFormatter):
        format_type = "e2b/data"

    class _ChartFormatter(_DictFormatter):
        format_type = "e2b/chart"

    formatters = ip.display_formatter.formatters
    data = formatters["e2b/data"] = _DataFormatter(parent=ip.display_formatter)
    chart = formatters["e2b/chart"] = _ChartFormatter(parent=ip.display_formatter)
    # IPython computes only the formats listed as active
    active = ip.display_formatter.active_types
    for mime in ("e2b/data", "e2b/chart"):
        if mime not in active:
            active.append(mime)

    def dataframe(df: Any) -> dict:
        # one JSON-safe list per column (NaN -> null, timestamps -> ISO strings)
        return {str(col): json.loads(df[col].to_json(orient="values", date_format="iso")) for col in df.columns}

    data.by_name[("pandas", "DataFrame")] = dataframe
    data.by_name[("pandas.core.frame", "DataFrame")] = dataframe

    def figure(fig: object) -> dict | None:
        try:
            from e2b_charts import chart_figure_to_dict

            return chart_figure_to_dict(fig)
        except Exception:  # a figure the extractor does not understand still shows as PNG
            return None

    chart.by_name[("matplotlib.figure", "Figure")] = figure

    import sys

    def patch_save(image_module: Any) -> None:
        original_save = image_module.Image.save
        busy = [False]

        def save_and_display(self: Any, *args: object, **kwargs: object) -> object:
            result = original_save(self, *args, **kwargs)
            # Only the user's own saves: matplotlib and IPython save PNGs through PIL while rendering.
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not busy[0] and not caller.startswith(("matplotlib", "PIL", "IPython", "ipykernel")):
                from IPython.display import display

                busy[0] = True
                try:
                    display(self)
                finally:
                    busy[0] = False
            return result

        image_module.Image.save = save_and_display

    if "PIL.Image" in sys.modules:
        patch_save(sys.modules["PIL.Image"])
        return

    import importlib.abc
    import importlib.util

    class _PatchWhenImported(importlib.abc.MetaPathFinder):
        """Patches PIL.Image when code first imports it, not at kernel start (PIL costs an idle
        kernel about 1 MiB)."""

        def find_spec(self, name: str, path: object, target: object = None) -> Any:
            if name != "PIL.Image":
                return None
            sys.meta_path.remove(self)  # once; and the lookup below must not find us again
            spec = importlib.util.find_spec(name)
            loader = getattr(spec, "loader", None)
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            run = loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                patch_save(module)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchWhenImported())


_install()
del _install
