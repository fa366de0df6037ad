//! The SAM family's entry points: each a validated, claimed call over every array of a
//! dict that writes a variant's direction into the variant's own buffers (the formulas are
//! in `crate::family`), and the cosine between two dicts of gradients (`crate::norm`).

use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

use super::api::{borrow, prepare_stateless, Names};
use super::arrays::{self, norm_gradient, norm_source, sorted_entries, Float, NormSource};
use super::driver::Entry;
use crate::claims::{self, CallClaims};
use crate::family::{self, CentreSource, FisherSource, MaskSource, Rows};
use crate::norm::{self, DotItem, NormItem};
use crate::parallel::ByDtype;

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
    let outcome = py.detach(|| -> Result<(f64, f64, f64), norm::NormError> {
        let na = norm::global_norm_parts(&first)?;
        let nb = norm::global_norm(&second)?;
        let cos = if na.mantissa > 0.0 && nb > 0.0 {
            norm::normalised_dot(&dots, na, nb)
        } else {
            0.0
        };
        Ok((cos, na.value(), nb))
    });
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
    module.add_function(wrap_pyfunction!(cosine, module)?)?;
    Ok(())
}
