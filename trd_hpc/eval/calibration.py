"""Post-hoc calibration of a binary classifier's scores (fitted on validation).

Three sklearn-style calibrators share one interface::

    cal = PlattCalibrator().fit(logit_val, y_val)
    prob_test = cal.predict_proba(logit_test)

Each takes ``input="logit"`` (default) or ``input="prob"`` so either kind of
score can be passed; internally Platt and temperature work on the logit and
isotonic on the probability.

All three maps are monotone non-decreasing, so the ranking of the test scores -
and therefore ROC AUC - is preserved: Platt (with a > 0) and temperature are
strictly monotone and keep AUC exactly; isotonic regression is a step function
that can merge distinct scores into ties, so its AUC (and AP) can drop slightly.
``calibrate_all`` reports AUC after every method so such a drop is visible.
What calibration can change is the 0.5-threshold accuracy, Brier score and ECE.
Temperature scaling only rescales the logit (``z / T``) and cannot move the
decision boundary away from logit 0: a model whose scores are all shifted to
one side of 0.5 keeps its 0.5-threshold accuracy under temperature scaling.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from scipy.special import logit as _logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from trd_hpc.eval.metrics import binary_metrics

InputKind = Literal["logit", "prob"]
_EPS = 1e-7
# A calibrator is a map fitted to the validation labels: with fewer than this many
# validation subjects of either class it is fitted to noise, so it is not fitted at all.
MIN_PER_CLASS = 5
# An output this close to 0 or 1 is a certainty no calibrated model should claim; a
# calibrator that gives it to at least COLLAPSED_SHARE of the validation subjects has
# collapsed onto the labels (perfectly separated validation scores do this to all three).
COLLAPSE_EPS = 1e-6
COLLAPSED_SHARE = 0.5


def _as_logit(x, kind: InputKind) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    return a if kind == "logit" else _logit(np.clip(a, _EPS, 1 - _EPS))


def _as_prob(x, kind: InputKind) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    return expit(a) if kind == "logit" else a


def _labels(y, n: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.size != n:
        raise ValueError(f"{n} scores but {y.size} labels")
    if not (0 < y.sum() < y.size):
        raise ValueError("calibration needs both classes in the fitting set")
    counts = np.bincount(y, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise ValueError(
            f"not fitted: {counts[0]} negative and {counts[1]} positive validation subjects; calibration needs "
            f"at least {MIN_PER_CLASS} of each class"
        )
    return y


class _Calibrator:
    def __init__(self, input: InputKind = "logit"):
        if input not in ("logit", "prob"):
            raise ValueError(f"input must be 'logit' or 'prob', got {input!r}")
        self.input = input
        self.fitted = False

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")

    def params(self) -> dict:
        return {}


class PlattCalibrator(_Calibrator):
    """``p = sigmoid(a * z + b)`` with a, b from logistic regression on the logit z.

    C is large so the fit is (almost) unregularised maximum likelihood, as in
    Platt's method; the default C = 1 would shrink ``a`` towards 0.
    """

    def __init__(self, input: InputKind = "logit", C: float = 1e6):
        super().__init__(input)
        self.C = C

    def fit(self, x_val, y_val) -> "PlattCalibrator":
        z = _as_logit(x_val, self.input)
        y = _labels(y_val, z.size)
        lr = LogisticRegression(C=self.C, max_iter=1000).fit(z[:, None], y)
        self.a, self.b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        self.fitted = True
        return self

    def predict_proba(self, x) -> np.ndarray:
        self._check_fitted()
        return expit(self.a * _as_logit(x, self.input) + self.b)

    def params(self) -> dict:
        return {"a": self.a, "b": self.b} if self.fitted else {}


class IsotonicCalibrator(_Calibrator):
    """Monotone step function on the probability; test scores outside the
    validation range are clipped to the end steps."""

    def fit(self, x_val, y_val) -> "IsotonicCalibrator":
        p = _as_prob(x_val, self.input)
        y = _labels(y_val, p.size)
        self.iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
        self.fitted = True
        return self

    def predict_proba(self, x) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self.iso.predict(_as_prob(x, self.input)), dtype=np.float64)

    def params(self) -> dict:
        return {"n_steps": int(len(self.iso.X_thresholds_))} if self.fitted else {}


class TemperatureCalibrator(_Calibrator):
    """``p = sigmoid(z / T)`` with T in ``bounds`` minimising the validation NLL."""

    def __init__(self, input: InputKind = "logit", bounds: tuple[float, float] = (0.05, 20.0)):
        super().__init__(input)
        self.bounds = bounds

    def fit(self, x_val, y_val) -> "TemperatureCalibrator":
        z = _as_logit(x_val, self.input)
        y = _labels(y_val, z.size).astype(np.float64)

        def nll(t: float) -> float:
            s = z / t
            # log(1 + e^s) - y*s, written stably
            return float(np.mean(np.logaddexp(0.0, s) - y * s))

        res = minimize_scalar(nll, bounds=self.bounds, method="bounded", options={"xatol": 1e-5})
        self.T = float(res.x)
        self.fitted = True
        return self

    def predict_proba(self, x) -> np.ndarray:
        self._check_fitted()
        return expit(_as_logit(x, self.input) / self.T)

    def params(self) -> dict:
        return {"T": self.T} if self.fitted else {}


def degenerate(cal: _Calibrator, x_val, input: InputKind = "logit") -> str | None:
    """Why a fitted calibrator must not be trusted as a model's probabilities, or None.

    Flagged: a temperature stopped at a bound of its search (the NLL wanted a T outside it:
    on separable validation scores T -> 0, every output 0 or 1); a Platt slope a <= 0 (the
    map ignores or reverses the model's ranking); a constant output; or outputs within
    COLLAPSE_EPS of 0 or 1 for at least COLLAPSED_SHARE of the validation subjects."""
    cal._check_fitted()
    if isinstance(cal, TemperatureCalibrator):
        lo, hi = cal.bounds
        if cal.T <= lo * (1 + 1e-3) or cal.T >= hi * (1 - 1e-3):
            bound = "lower" if cal.T <= lo * (1 + 1e-3) else "upper"
            return f"T = {cal.T:.3g} stopped at the {bound} bound of its search ({lo:g}..{hi:g})"
    if isinstance(cal, PlattCalibrator) and cal.a <= 0:
        return f"slope a = {cal.a:.3g} <= 0: the map ignores or reverses the model's ranking"
    p = cal.predict_proba(x_val) if input == cal.input else cal.predict_proba(_as_logit(x_val, input))
    if p.size and float(np.ptp(p)) < COLLAPSE_EPS:
        return f"constant output ({float(p[0]):.3g} for every validation subject)"
    share = float(np.mean((p < COLLAPSE_EPS) | (p > 1 - COLLAPSE_EPS))) if p.size else 0.0
    if share >= COLLAPSED_SHARE:
        return f"collapsed: {share:.0%} of its validation outputs are within {COLLAPSE_EPS:g} of 0 or 1"
    return None


CALIBRATORS: dict[str, type[_Calibrator]] = {
    "platt": PlattCalibrator,
    "isotonic": IsotonicCalibrator,
    "temperature": TemperatureCalibrator,
}
# How figures and the report name each method (and the raw sigmoid of the logits).
METHOD_LABELS = {"uncalibrated": "uncalibrated", "platt": "Platt", "isotonic": "isotonic", "temperature": "temperature"}


def make_calibrator(method: str, input: InputKind = "logit") -> _Calibrator:
    if method not in CALIBRATORS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {sorted(CALIBRATORS)}")
    return CALIBRATORS[method](input=input)


def calibrate_all(
    logit_val,
    y_val,
    logit_test,
    y_test,
    methods: Sequence[str] = ("platt", "isotonic", "temperature"),
    n_bins: int = 10,
    return_probs: bool = False,
):
    """Fit each method on validation logits, evaluate on test logits.

    Returns ``{"uncalibrated": metrics, "<method>": metrics | {"error": msg}}``
    where metrics are :func:`binary_metrics` at threshold 0.5 (accuracy, F1,
    AUC, AP, Brier, ECE, ...) plus the fitted parameters (Platt ``a``, ``b``;
    temperature ``T``; isotonic ``n_steps``).  AUC is unchanged by Platt and
    temperature and may drop slightly under isotonic (ties); see the module
    docstring.  A method that cannot be fitted (e.g. fewer than MIN_PER_CLASS of a
    class in validation) gets ``{"error": ...}`` instead of failing the whole
    evaluation; one that fitted but is degenerate (see :func:`degenerate`) carries
    ``"degenerate": why``.

    With ``return_probs=True`` returns ``(results, probs)`` where ``probs`` maps
    "uncalibrated" and each fitted method to its test probabilities.
    """
    z_test = _as_logit(logit_test, "logit")
    probs = {"uncalibrated": expit(z_test)}
    results: dict = {"uncalibrated": binary_metrics(y_test, probs["uncalibrated"], 0.5, n_bins)}
    for m in methods:
        try:
            cal = make_calibrator(m).fit(logit_val, y_val)
        except ValueError as e:
            results[m] = {"error": str(e)}
            continue
        probs[m] = cal.predict_proba(z_test)
        results[m] = {**binary_metrics(y_test, probs[m], 0.5, n_bins), **cal.params()}
        why = degenerate(cal, logit_val)
        if why:
            results[m]["degenerate"] = why
    return (results, probs) if return_probs else results


# --------------------------------------------------------------------------- saved calibrators
def calibrator_state(cal: _Calibrator) -> dict:
    """What a fitted calibrator needs to predict again, as JSON (a model bundle's)."""
    cal._check_fitted()
    if isinstance(cal, PlattCalibrator):
        return {"method": "platt", "a": cal.a, "b": cal.b}
    if isinstance(cal, TemperatureCalibrator):
        return {"method": "temperature", "T": cal.T}
    if isinstance(cal, IsotonicCalibrator):
        return {
            "method": "isotonic",
            "x": [float(v) for v in cal.iso.X_thresholds_],
            "y": [float(v) for v in cal.iso.y_thresholds_],
        }
    raise TypeError(f"no saved form for {type(cal).__name__}")


def apply_calibrator(state: dict | None, logit) -> np.ndarray:
    """P(positive) from logits with a saved calibrator (None: the plain sigmoid)."""
    z = _as_logit(logit, "logit")
    if state is None:
        return expit(z)
    m = state["method"]
    if m == "platt":
        return expit(state["a"] * z + state["b"])
    if m == "temperature":
        return expit(z / state["T"])
    if m == "isotonic":
        # IsotonicRegression(out_of_bounds="clip").predict: linear between thresholds, clipped
        return np.interp(expit(z), np.asarray(state["x"]), np.asarray(state["y"]))
    raise ValueError(f"unknown calibration method {m!r} in a saved calibrator")


def choose_calibrator(
    logit_val, y_val, methods: Sequence[str], n_bins: int = 10, seed: int = 0
) -> tuple[str | None, dict]:
    """The method whose out-of-fold ECE on the validation split is lowest, and each method's.

    Fitted and scored on the same subjects, isotonic regression would always win (it can
    fit the validation labels almost exactly); cross-fitting over up to 5 stratified folds
    of the validation split scores each method on subjects it was not fitted on.  None when
    the validation split is too small to cross-fit (fewer than 2 of a class)."""
    from sklearn.model_selection import StratifiedKFold

    from trd_hpc.eval.metrics import expected_calibration_error

    z = _as_logit(logit_val, "logit")
    y = np.asarray(y_val).reshape(-1).astype(np.int64)
    k = min(5, int(np.bincount(y, minlength=2).min()))
    if k < 2 or not methods:
        return None, {}
    scores: dict[str, float] = {}
    for m in methods:
        oof = np.empty_like(z)
        try:
            for fit, held in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(z[:, None], y):
                oof[held] = make_calibrator(m).fit(z[fit], y[fit]).predict_proba(z[held])
        except ValueError:  # a fold with one class
            continue
        scores[m] = float(expected_calibration_error(y, oof, n_bins))
    if not scores:
        return None, {}
    return min(scores, key=lambda m: (scores[m], m)), scores
