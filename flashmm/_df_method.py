"""The denominator-df methods every test accepts, and their spelling (the lowest layer)."""

from __future__ import annotations

__all__ = ["DF_METHODS", "KENWARD_ROGER", "check_df_method"]

KENWARD_ROGER = "kenward-roger"
#: The methods, as lmerTest and statsmodels name them.
DF_METHODS = ("satterthwaite", KENWARD_ROGER, "residual", "normal")
_ALIASES = {"kr": KENWARD_ROGER, "kenward roger": KENWARD_ROGER, "kenwardroger": KENWARD_ROGER}


def check_df_method(df_method: str, reml: bool = True) -> str:
    """The canonical name of ``df_method``, or a clear error.

    Parameters
    ----------
    df_method : str
        ``"satterthwaite"``, ``"kenward-roger"`` (also ``"KR"``,
        ``"Kenward-Roger"``, ``"kenward_roger"``), ``"residual"`` or ``"normal"``.
    reml : bool
        Whether the fit is REML; Kenward-Roger needs one (as lmerTest and pbkrtest).

    Returns
    -------
    str
        One of :data:`DF_METHODS`.

    Raises
    ------
    ValueError
        For an unknown method, or Kenward-Roger on an ML fit.
    """
    method = str(df_method).lower().replace("_", "-")
    method = _ALIASES.get(method, method)
    if method not in DF_METHODS:
        raise ValueError(f"df_method must be one of {DF_METHODS}, got {df_method!r}.")
    if method == KENWARD_ROGER and not reml:
        raise ValueError(
            "df_method='kenward-roger' needs a REML fit (as lmerTest and pbkrtest); refit with "
            "reml=True, or use df_method='satterthwaite'."
        )
    return method
