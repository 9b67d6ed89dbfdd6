"""The online softmax state every kernel shares, and the soft-capping of logits on load.

A running softmax over a stream of values x keeps m = max x and s = sum e^{x - m}; accumulators
of e^{x - m} * (a value centered on m) ride along. When the max moves from m to m', every old
term picks up alpha = e^{m - m'} and a centered value shifts by the constant m - m':
    s <- alpha s,   c <- alpha (c + s (m - m'))                              (``moved``)
Two states (of two splits of a row, or two lanes) merge the same way toward their common max
(``merge``). Every 0 * inf is guarded: a max still at -inf is centered on 0 (``reference_max``),
s = 0 means nothing was accumulated, alpha = 0 means the old terms vanish.

Soft-capping (Gemma 2's final logits): z_c = c tanh(z / c), with tanh(u) =
sign(u) (1 - e^{-2|u|}) / (1 + e^{-2|u|}) so that no libdevice call is needed (the CPU
interpreter has none) and nothing overflows; below |u| = 1/8, where 1 - e^{-2|u|} would cancel,
its odd series to u^7 (relative error < 3e-10). dz_c/dz = 1 - (z_c / c)^2. A cap of 0 means none.
"""
import triton
import triton.language as tl

AOT_SPECS = []  # helpers only: compiled as part of the kernels that use them


@triton.jit
def reference_max(m):
    """The max to center on: 0 while no finite value has been seen (avoids -inf - -inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def moved(acc, alpha, s_old, shift):
    """alpha * (acc + s_old * shift): an accumulator of e^{x - m} * (centered value) moved to a
    new max. s_old = 0 means nothing was accumulated (and shift may be infinite); alpha = 0 means
    the old terms vanish against the new max."""
    moved_acc = acc + tl.where(s_old > 0, s_old * shift, 0.0)
    return tl.where(alpha > 0, alpha * moved_acc, 0.0)


@triton.jit
def max_shift(m_old, m_new):
    """m_old - m_new, 0 when the max did not move (-inf included)."""
    return tl.where(m_old == m_new, 0.0, m_old - m_new)


@triton.jit
def lane_step(x, m):
    """One new value x per lane into a lane's running (m, s): with one exp, e^{-|x - m|}.
    Returns the new max, the factor alpha on the old terms, e^{x - m_new}, the max shift
    m_old - m_new, and the centered value x - m_new (-inf where x = -inf)."""
    grow = x > m
    d = tl.where(grow, m - x, x - m)
    t = tl.exp(tl.where(x == float("-inf"), float("-inf"), d))
    alpha = tl.where(grow, t, 1.0)
    e = tl.where(grow, 1.0, t)
    shift = tl.where(grow, d, 0.0)
    centered = tl.where(grow, 0.0, tl.where(x == float("-inf"), float("-inf"), d))
    return tl.maximum(m, x), alpha, e, shift, centered


@triton.jit
def tile_step(x, m):
    """A [rows, cols] tile of new values into per-row running maxima m [rows]: returns the new
    max, alpha = e^{m - m_new} on the old terms, and e^{x - m_new} (0 where x = -inf)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    center = reference_max(m_new)
    return m_new, tl.exp(m - center), tl.exp(x - center[:, None])


@triton.jit
def fold_max(m):
    """States held along axis 0 (a block's lanes, or a row's splits) toward their common max:
    (the max, each state's alpha = e^{m - max}, each state's shift m - max)."""
    m_max = tl.max(m, axis=0)
    return m_max, tl.exp(m - reference_max(m_max)), max_shift(m, m_max)


@triton.jit
def merge(m_a, s_a, m_b, s_b):
    """Two states (m, s) toward their common max: (m, s, alpha_a, alpha_b), where alpha_x
    rescales state x's other accumulators."""
    m = tl.maximum(m_a, m_b)
    center = reference_max(m)
    alpha_a = tl.exp(m_a - center)
    alpha_b = tl.exp(m_b - center)
    return m, s_a * alpha_a + s_b * alpha_b, alpha_a, alpha_b


@triton.jit
def softcapped(z, cap):
    """c tanh(z / c) for cap c > 0; z itself for cap 0."""
    if cap > 0:
        u = z / cap
        t = tl.exp(-2.0 * tl.abs(u))
        u2 = u * u
        series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 - u2 * (17.0 / 315.0))))
        z = cap * tl.where(tl.abs(u) < 0.125, series,
                           tl.where(u < 0, -1.0, 1.0) * ((1.0 - t) / (1.0 + t)))
    return z


@triton.jit
def softcap_grad(z_capped, cap):
    """dz_c/dz = 1 - (z_c / c)^2 from the capped value; 1 for cap 0."""
    g = tl.full(z_capped.shape, 1.0, tl.float32)
    if cap > 0:
        r = z_capped / cap
        g = 1.0 - r * r
    return g


@triton.jit
def log_mixture(log_p, log_q, log_beta, log_1m_beta):
    """log(beta q + (1 - beta) p) from log p, log q, stable for either at -inf."""
    a = log_q + log_beta
    b = log_p + log_1m_beta
    top = tl.maximum(a, b)
    center = tl.where(top == float("-inf"), 0.0, top)
    return center + tl.log(tl.exp(a - center) + tl.exp(b - center))
