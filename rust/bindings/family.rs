//! The SAM family's entry points: each a validated, claimed call over every array of a
//! dict that writes a variant's direction into the variant's own buffers (the formulas are
//! in `crate::family`), and the cosine between two dicts of gradients (`crate::phases`).

use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

use super::api::{borrow, prepare_stateless, Names};
use super::arrays::{self, norm_gradient, norm_source, sorted_entries, Float, NormSource};
use super::driver::{Entry, Prepared};
use crate::claims::{self, CallClaims};
use crate::family::{
    self, BsamHyper, CentreSource, FisherSource, MaskSource, NoiseSource, Rows, Whole,
};
use crate::norm::{self, DotItem, NormItem};
use crate::parallel::ByDtype;
use crate::phases::{self, CombineItem};

fn centre_source<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> CentreSource<'a, T> {
    let rows = Rows::of(entry.param.shape(), entry.param.order().fortran());
    let (out, grad, _) = entry.lanes();
    (out, grad.expect("a call with gradients"), rows)
}

/// GCSAM's direction: `out[k] ← g[k]` with each row's mean removed (arrays of two or more
/// dimensions), the gradients converted to the buffers' dtype.
#[pyfunction]
fn centralize(
    py: Python<'_>,
    names: &Bound<'_, Names>,
    out: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let mut prepared = prepare_stateless(&mut *borrow(names)?, out, Some(grads))?;
    let items = prepared.lanes(centre_source::<f32>, centre_source::<f64>);
    py.detach(move || family::centralize(items));
    prepared.commit(&mut []);
    Ok(())
}

fn mask_source<'a, T: Float>(entry: &'a mut Entry<'_, T>, keys: &[u64]) -> MaskSource<'a, T> {
    let key = keys[entry.item];
    let (out, grad, _) = entry.lanes();
    (out, grad.expect("a call with gradients"), key)
}

/// ESAM's direction: `out[k] ← m ⊙ g[k]`, each element kept with probability `keep` by
/// draw number `draw` of the generator seeded `seed`.
#[pyfunction]
fn mask(
    py: Python<'_>,
    names: &Bound<'_, Names>,
    out: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    seed: u64,
    draw: u64,
    keep: f64,
) -> PyResult<()> {
    let mut prepared = prepare_stateless(&mut *borrow(names)?, out, Some(grads))?;
    let keys: Vec<u64> = prepared
        .names
        .iter()
        .map(|key| family::draw_key(seed, draw, family::name_key(&key.text())))
        .collect();
    let items = prepared.lanes(|e| mask_source(e, &keys), |e| mask_source(e, &keys));
    py.detach(move || family::mask(items, keep));
    prepared.commit(&mut []);
    Ok(())
}

fn fisher_source<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> FisherSource<'a, T> {
    let (out, grad, _) = entry.lanes();
    (out, grad.expect("a call with gradients"))
}

/// Fisher SAM's direction: `out[k] ← g[k] / (1 + eta·g[k]²)`.
#[pyfunction]
fn fisher(
    py: Python<'_>,
    names: &Bound<'_, Names>,
    out: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    eta: f64,
) -> PyResult<()> {
    let mut prepared = prepare_stateless(&mut *borrow(names)?, out, Some(grads))?;
    let items = prepared.lanes(fisher_source::<f32>, fisher_source::<f64>);
    py.detach(move || family::fisher(items, eta));
    prepared.commit(&mut []);
    Ok(())
}

fn noise_source<'a, T: Float>(entry: &'a mut Entry<'_, T>, keys: &[u64]) -> NoiseSource<'a, T> {
    let key = keys[entry.item];
    let (out, s, _) = entry.lanes();
    (out, s.expect("a call with the precision"), key)
}

/// bSAM's noise: `out[k] ← n/√(num_data·s[k])`, `n ~ N(0, 1)` by draw number `draw` of
/// the generator seeded `seed`.
#[pyfunction]
fn noise(
    py: Python<'_>,
    names: &Bound<'_, Names>,
    out: &Bound<'_, PyDict>,
    precision: &Bound<'_, PyDict>,
    seed: u64,
    draw: u64,
    num_data: f64,
) -> PyResult<()> {
    let mut prepared = prepare_stateless(&mut *borrow(names)?, out, Some(precision))?;
    let keys: Vec<u64> = prepared
        .names
        .iter()
        .map(|key| family::draw_key(seed, draw, family::name_key(&key.text())))
        .collect();
    let items = prepared.lanes(|e| noise_source(e, &keys), |e| noise_source(e, &keys));
    py.detach(move || family::noise(items, num_data));
    prepared.commit(&mut []);
    Ok(())
}

/// Calls over dicts of the same names: each prepared alone (its memory claimed, its
/// gradients converted), then checked to agree name by name in dtype.
fn same_layout(calls: &[&Prepared<'_>]) -> PyResult<()> {
    let first = calls[0];
    for other in &calls[1..] {
        let same_names = other.names.len() == first.names.len()
            && other
                .names
                .iter()
                .zip(&first.names)
                .all(|(a, b)| a.text() == b.text());
        if !same_names || other.is_single != first.is_single {
            let index = (0..first.names.len().min(other.names.len()))
                .find(|&i| other.is_single.get(i) != first.is_single.get(i))
                .unwrap_or(0);
            let name = first.names.get(index).map(|k| k.text()).unwrap_or_default();
            return Err(super::optimizer_error(
                &name,
                format!("the state of '{name}' does not have its parameter's names or dtypes"),
            ));
        }
    }
    Ok(())
}

fn pair<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> (&'a mut [T], &'a [T]) {
    let (out, g, _) = entry.lanes();
    (out, g.expect("a call with a source"))
}

fn alone<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> &'a mut [T] {
    entry.lanes().0
}

/// A call over `out`, read from `x` (converted to `out`'s dtypes as a gradient is) and
/// from `y`, a buffer of the optimizer's own laid out as `out`: the kernel gets
/// `(out, x, y)` per parameter.
fn with_buffer(
    py: Python<'_>,
    names: (Bound<'_, Names>, Bound<'_, Names>),
    out: &Bound<'_, PyDict>,
    x: &Bound<'_, PyDict>,
    y: &Bound<'_, PyDict>,
    kernel: impl FnOnce(Vec<CombineItem<'_>>) + Send,
) -> PyResult<()> {
    let mut outs = prepare_stateless(&mut *borrow(&names.0)?, out, Some(x))?;
    let mut ys = prepare_stateless(&mut *borrow(&names.1)?, y, None)?;
    same_layout(&[&outs, &ys])?;
    same_shapes(&outs.singles, &ys.singles, &outs.names)?;
    same_shapes(&outs.doubles, &ys.doubles, &outs.names)?;
    let firsts = outs.lanes(pair::<f32>, pair::<f64>);
    let seconds = ys.lanes(alone::<f32>, alone::<f64>);
    let mut items = Vec::with_capacity(firsts.len());
    for (first, second) in firsts.into_iter().zip(seconds) {
        items.push(match (first, second) {
            (ByDtype::Single((o, x)), ByDtype::Single(y)) => ByDtype::Single((o, x, &*y)),
            (ByDtype::Double((o, x)), ByDtype::Double(y)) => ByDtype::Double((o, x, &*y)),
            _ => unreachable!("dtypes checked by same_layout"),
        });
    }
    py.detach(move || kernel(items));
    outs.commit(&mut []);
    ys.commit(&mut []);
    Ok(())
}

/// `y`'s entries of `out`'s shapes and memory orders, so that the kernels pair their
/// elements index by index (`same_layout` checked names and dtypes).
fn same_shapes<T: Float>(
    outs: &[Entry<'_, T>],
    ys: &[Entry<'_, T>],
    names: &[super::arrays::Key<'_>],
) -> PyResult<()> {
    for (out, y) in outs.iter().zip(ys) {
        if out.param.shape() != y.param.shape() || out.param.order() != y.param.order() {
            let name = names[out.item].text();
            return Err(super::optimizer_error(
                &name,
                format!(
                    "the state of '{name}' has shape {:?} but its parameter has shape {:?}",
                    y.param.shape(),
                    out.param.shape()
                ),
            ));
        }
    }
    Ok(())
}

/// bSAM's ascent direction: `out[k] ← g[k]/s[k]`.
#[pyfunction]
fn divide(
    py: Python<'_>,
    names: (Bound<'_, Names>, Bound<'_, Names>),
    out: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    precision: &Bound<'_, PyDict>,
) -> PyResult<()> {
    with_buffer(py, names, out, grads, precision, family::divide)
}

/// The SAM family's mixes of two gradients in one pass: `out[k] ← a·x[k] + b·y[k]`
/// (`phases::combine`). Nothing is checked finite: the callers have (the norms and
/// cosines they scale by), or write a buffer they only keep on success.
#[pyfunction]
fn combine(
    py: Python<'_>,
    names: (Bound<'_, Names>, Bound<'_, Names>),
    out: &Bound<'_, PyDict>,
    x: &Bound<'_, PyDict>,
    a: f64,
    y: &Bound<'_, PyDict>,
    b: f64,
) -> PyResult<()> {
    with_buffer(py, names, out, x, y, move |items| {
        phases::combine(items, a, b)
    })
}

/// One bSAM update of the parameters, the momentum and the precision
/// (`family::bsam_update`): `ascended` is the gradient at the ascent's point, `sampled`
/// the gradient at the noisy sample; `hypers[k]` is parameter group k's
/// `(lr, beta1, beta2, delta, damping)`, the optimizer's own first, and `groups` maps a
/// parameter's name to its group (a name it lacks is in group 0).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn bsam_update(
    py: Python<'_>,
    names: (Bound<'_, Names>, Bound<'_, Names>, Bound<'_, Names>),
    params: &Bound<'_, PyDict>,
    ascended: &Bound<'_, PyDict>,
    momentum: &Bound<'_, PyDict>,
    sampled: &Bound<'_, PyDict>,
    precision: &Bound<'_, PyDict>,
    hypers: Vec<(f64, f64, f64, f64, f64)>,
    groups: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let hypers: Vec<BsamHyper> = hypers
        .into_iter()
        .map(|(lr, beta1, beta2, delta, damping)| BsamHyper {
            lr,
            beta1,
            beta2,
            delta,
            damping,
        })
        .collect();
    let mut weights = prepare_stateless(&mut *borrow(&names.0)?, params, Some(ascended))?;
    let group_of = weights
        .names
        .iter()
        .map(|name| -> PyResult<u32> {
            let group = match groups.get_item(&name.0)? {
                Some(group) => group.extract::<u32>()?,
                None => 0,
            };
            match (group as usize) < hypers.len() {
                true => Ok(group),
                false => Err(super::optimizer_error(
                    &name.text(),
                    format!("'{}' is in group {group}, which has no values", name.text()),
                )),
            }
        })
        .collect::<PyResult<Vec<u32>>>()?;
    let mut moments = prepare_stateless(&mut *borrow(&names.1)?, momentum, Some(sampled))?;
    let mut precisions = prepare_stateless(&mut *borrow(&names.2)?, precision, None)?;
    same_layout(&[&weights, &moments, &precisions])?;
    let finite = |prepared: &mut Prepared<'_>| -> PyResult<()> {
        let items: Vec<NormItem<'_>> = prepared
            .lanes(pair::<f32>, pair::<f64>)
            .into_iter()
            .map(|item| match item {
                ByDtype::Single((_, g)) => ByDtype::Single((g, None)),
                ByDtype::Double((_, g)) => ByDtype::Double((g, None)),
            })
            .collect();
        let checked = py.detach(|| norm::check_finite(&items));
        drop(items);
        checked.map_err(|error| prepared.norm_error(error))
    };
    finite(&mut weights)?;
    finite(&mut moments)?;
    let ws = weights.lanes(pair::<f32>, pair::<f64>);
    let ms = moments.lanes(pair::<f32>, pair::<f64>);
    let ss = precisions.lanes(alone::<f32>, alone::<f64>);
    let mut items = Vec::with_capacity(ws.len());
    // The lanes are in name order, as `group_of`.
    for (((w, m), s), group) in ws.into_iter().zip(ms).zip(ss).zip(group_of) {
        let group = Whole(group);
        items.push(match (w, m, s) {
            (ByDtype::Single((w, ge)), ByDtype::Single((m, g)), ByDtype::Single(s)) => {
                ByDtype::Single((w, ge, m, g, s, group))
            }
            (ByDtype::Double((w, ge)), ByDtype::Double((m, g)), ByDtype::Double(s)) => {
                ByDtype::Double((w, ge, m, g, s, group))
            }
            _ => unreachable!("dtypes checked by same_layout"),
        });
    }
    py.detach(move || family::bsam_update(items, &hypers));
    weights.commit(&mut []);
    moments.commit(&mut []);
    precisions.commit(&mut []);
    Ok(())
}

/// `(cos, ‖a‖, ‖b‖)` for two dicts of gradients over `a`'s names (each of `b`'s of the
/// same shape); `cos` is 0 when either norm is. Raises NonFiniteGradientError on NaN or
/// infinity.
#[pyfunction]
fn cosine(
    py: Python<'_>,
    a: &Bound<'_, PyDict>,
    b: &Bound<'_, PyDict>,
) -> PyResult<(f64, f64, f64)> {
    use numpy::PyUntypedArrayMethods;
    let entries = sorted_entries(a, None)?;
    let mut names = Vec::with_capacity(entries.len());
    let mut firsts = Vec::with_capacity(entries.len());
    let mut claims = Vec::with_capacity(2 * entries.len());
    let n = entries.len();
    let mut seconds = Vec::with_capacity(n);
    for (item, (key, object)) in entries.into_iter().enumerate() {
        let array = norm_gradient(object, &key)?;
        let other = arrays::checked_grad(b, &key, array.shape())?;
        claims.push(arrays::claim_of(&array, false, item));
        claims.push(arrays::claim_of(&other, false, n + item));
        firsts.push(array);
        seconds.push(other);
        names.push(key);
    }
    let _registration =
        claims::register(Arc::new(CallClaims::new(claims))).map_err(|conflict| {
            let item = conflict.item % n.max(1);
            arrays::shared_memory_error("gradient", &names[item].text())
        })?;
    let mut sources = Vec::with_capacity(n);
    for ((array, other), key) in firsts.into_iter().zip(seconds).zip(&names) {
        // `b` is read laid out as `a` is, converted to `a`'s dtype.
        let order = arrays::Order::of(&array);
        let pair = match norm_source(array, key)? {
            NormSource::Single(x) => {
                ByDtype::Single((x, arrays::gradient_source::<f32>(other, key, order)?))
            }
            NormSource::Double(x) => {
                ByDtype::Double((x, arrays::gradient_source::<f64>(other, key, order)?))
            }
        };
        sources.push(pair);
    }
    let first: Vec<NormItem<'_>> = sources
        .iter()
        .map(|pair| match pair {
            ByDtype::Single((x, _)) => ByDtype::Single((x.slice(), None)),
            ByDtype::Double((x, _)) => ByDtype::Double((x.slice(), None)),
        })
        .collect();
    let second: Vec<NormItem<'_>> = sources
        .iter()
        .map(|pair| match pair {
            ByDtype::Single((_, y)) => ByDtype::Single((y.slice(), None)),
            ByDtype::Double((_, y)) => ByDtype::Double((y.slice(), None)),
        })
        .collect();
    let dots: Vec<DotItem<'_>> = sources
        .iter()
        .map(|pair| match pair {
            ByDtype::Single((x, y)) => ByDtype::Single((x.slice(), y.slice())),
            ByDtype::Double((x, y)) => ByDtype::Double((x.slice(), y.slice())),
        })
        .collect();
    let outcome = py.detach(|| phases::cosine(&first, &second, &dots));
    outcome.map_err(|error| {
        let index = match error {
            norm::NormError::NonFiniteGradient(i) | norm::NormError::NonFiniteParameter(i) => i,
        };
        let name = names[index].text();
        super::non_finite_error(&name, format!("gradient '{name}' contains NaN or infinity"))
    })
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(centralize, module)?)?;
    module.add_function(wrap_pyfunction!(mask, module)?)?;
    module.add_function(wrap_pyfunction!(fisher, module)?)?;
    module.add_function(wrap_pyfunction!(noise, module)?)?;
    module.add_function(wrap_pyfunction!(divide, module)?)?;
    module.add_function(wrap_pyfunction!(combine, module)?)?;
    module.add_function(wrap_pyfunction!(bsam_update, module)?)?;
    module.add_function(wrap_pyfunction!(cosine, module)?)?;
    Ok(())
}
