//! The layer-wise optimizers' native state (`LayerEngine`) and their step, plain or as
//! SAM's second step with the restore fused in: the same driver and commit as the
//! element-wise optimizers (`api`), with the two-pass phase of `crate::layerwise`. No
//! arithmetic lives here.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::api::{prepare_base_call, BaseTable, SamPart};
use super::arrays::{self, Float, NameOrder};
use super::driver::{prepare, Entry, EntryCache, Groups, Policy, TableRef, Use};
use super::engine::{export_table, hyper_of};
use super::optimizer_error;
use super::statedict::StagedTable;
use crate::kernels::GroupStep;
use crate::layerwise::{
    self, AdamP, HessianLanes, Lamb, Lars, LayerHyper, LayerLanes, LayerSpec, Rows, Sophia,
};
use crate::phases::Clipping;
use crate::state::Table;

/// The layer-wise optimizers, by the name the Python layer gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LayerKind {
    Lamb,
    Lars,
    Sophia,
    AdamP,
}

impl LayerKind {
    fn parse(name: &str) -> Option<LayerKind> {
        match name {
            "lamb" => Some(LayerKind::Lamb),
            "lars" => Some(LayerKind::Lars),
            "sophia" => Some(LayerKind::Sophia),
            "adamp" => Some(LayerKind::AdamP),
            _ => None,
        }
    }

    fn slots(self) -> &'static [&'static str] {
        match self {
            LayerKind::Lamb => &Lamb::SLOTS,
            LayerKind::Lars => &Lars::SLOTS,
            LayerKind::Sophia => &Sophia::SLOTS,
            LayerKind::AdamP => &AdamP::SLOTS,
        }
    }

    fn counts_steps(self) -> bool {
        self != LayerKind::Lars
    }
}

/// A layer-wise optimizer's native state. Its `assign(name)` returns `2·group + 1` for a
/// parameter left out of the layer-wise adaptation, `2·group` otherwise (AdamP also
/// leaves out the arrays of fewer than two axes).
#[pyclass(module = "samopt._core")]
pub struct LayerEngine {
    kind: LayerKind,
    groups: Vec<LayerHyper>,
    assign: Option<Py<PyAny>>,
    clipping: Clipping,
    steps: u64,
    /// Sophia: steps between refreshes of `h` from the step's own gradient, and steps
    /// since the last refresh or `update_hessian`.
    hessian_update_freq: u64,
    since_hessian: u64,
    table: Table,
    order: NameOrder,
    cache: EntryCache,
}

#[pymethods]
impl LayerEngine {
    #[new]
    #[pyo3(signature = (kind, groups, *, trust_coef = 0.0, sophia_rho = 0.0, hessian_update_freq = 1, adamp_delta = 0.0, adamp_wd_ratio = 1.0, clip_value = None, clip_norm = None, assign = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: &str,
        groups: Vec<Bound<'_, PyDict>>,
        trust_coef: f64,
        sophia_rho: f64,
        hessian_update_freq: u64,
        adamp_delta: f64,
        adamp_wd_ratio: f64,
        clip_value: Option<f64>,
        clip_norm: Option<f64>,
        assign: Option<Py<PyAny>>,
    ) -> PyResult<LayerEngine> {
        let kind = LayerKind::parse(kind)
            .ok_or_else(|| optimizer_error("kind", format!("unknown optimizer kind {kind:?}")))?;
        let clipping = match (clip_value, clip_norm) {
            (Some(c), _) => Clipping::Value(c),
            (None, Some(c)) => Clipping::Norm(c),
            (None, None) => Clipping::Off,
        };
        let groups = groups
            .iter()
            .map(|group| {
                Ok(LayerHyper {
                    base: hyper_of(group)?,
                    trust_coef,
                    sophia_rho,
                    refresh_hessian: false,
                    adamp_delta,
                    adamp_wd_ratio,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        if groups.is_empty() {
            let message = "an optimizer needs its own hyperparameters".to_owned();
            return Err(optimizer_error("groups", message));
        }
        Ok(LayerEngine {
            kind,
            groups,
            assign,
            clipping,
            steps: 0,
            hessian_update_freq: hessian_update_freq.max(1),
            since_hessian: 0,
            table: Table::new(kind.slots().len()),
            order: NameOrder::default(),
            cache: EntryCache::default(),
        })
    }

    /// Each group's learning rate, the optimizer's own first.
    #[getter]
    fn lrs(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.base.lr).collect()
    }

    #[setter]
    fn set_lrs(&mut self, lrs: Vec<f64>) -> PyResult<()> {
        super::assign_lrs(&mut self.groups, lrs, |g| &mut g.base.lr)
    }

    /// Steps taken (LAMB's `t`); 0 for LARS, which does not count them.
    #[getter]
    fn steps(&self) -> u64 {
        self.steps
    }

    #[getter]
    fn slots(&self) -> Vec<&'static str> {
        self.kind.slots().to_vec()
    }

    /// Sophia's steps since its Hessian estimate was last refreshed.
    #[getter]
    fn since_hessian(&self) -> u64 {
        self.since_hessian
    }

    /// Copies of the per-parameter state by key, `t` for LAMB and Sophia, and Sophia's
    /// `steps_since_hessian_update`, put into `into` when given.
    #[pyo3(signature = (into = None))]
    fn state_dict<'py>(
        &self,
        py: Python<'py>,
        into: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = into.unwrap_or_else(|| PyDict::new(py));
        if self.kind.counts_steps() {
            let t = arrays::array_from::<i64>(py, &[self.steps as i64], &[], false, "t")?;
            out.set_item("t", t)?;
        }
        if self.kind == LayerKind::Sophia {
            let key = "steps_since_hessian_update";
            let since = [self.since_hessian as i64];
            out.set_item(key, arrays::array_from::<i64>(py, &since, &[], false, key)?)?;
        }
        export_table(py, &self.table, self.kind.slots(), None, &out, None)?;
        Ok(out)
    }

    /// Replaces the whole state (checked and copied before anything is replaced).
    #[pyo3(signature = (steps, entries, since_hessian = 0))]
    fn load(&mut self, steps: u64, entries: &mut StagedTable, since_hessian: u64) -> PyResult<()> {
        let table = entries.take()?;
        if table.slots() != self.kind.slots().len() {
            let message = format!("a state table needs {} slots", self.kind.slots().len());
            return Err(optimizer_error("state", message));
        }
        self.table = table;
        self.steps = steps;
        self.since_hessian = since_hessian;
        Ok(())
    }
}

/// A layer-wise step's lanes for one entry: the `N` slots, then SAM's saved values and
/// GSAM's g0 when the step restarts from them. `channels`: an adapted array is first
/// tried row by row, its rows those of its first axis in the layout the kernels see.
fn layer_lanes<'a, T: Float, const N: usize>(
    entry: &'a mut Entry<'_, T>,
    restart: bool,
    mix: bool,
    min_axes: usize,
    channels: bool,
) -> LayerLanes<'a, T, N> {
    let (group, item) = (entry.group, entry.item);
    let axes = entry.param.shape().len();
    let adapt = group % 2 == 0 && axes >= min_axes;
    let rows = (channels && adapt && axes > 0).then(|| Rows {
        count: entry.param.shape()[0],
        fortran: entry.param.order().fortran(),
    });
    let (param, grad, states) = entry.lanes();
    let mut states = states.into_iter();
    let slots: [&mut [T]; N] = std::array::from_fn(|_| states.next().expect("one per slot"));
    let start = restart.then(|| &*states.next().expect("saved values"));
    let grad0 = mix.then(|| &*states.next().expect("GSAM's g0"));
    LayerLanes {
        param,
        grad: grad.expect("a base step has gradients"),
        slots,
        start,
        grad0,
        group: group / 2,
        item: item as u32,
        adapt,
        rows,
    }
}

/// One step of layer-wise spec `S`, plain or as SAM's second step (see
/// `api::base_step_of`, which this follows for the element-wise optimizers).
fn layer_step_of<const N: usize, S: LayerSpec<N>>(
    py: Python<'_>,
    base: &mut LayerEngine,
    sam: Option<SamPart<'_>>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let LayerEngine {
        kind,
        groups,
        assign,
        clipping,
        steps,
        hessian_update_freq,
        since_hessian,
        table,
        order,
        cache,
    } = base;
    let assigned = Groups {
        assign: assign.as_ref().map(|assign| assign.bind(py)),
        count: 2 * groups.len(),
    };
    let base = BaseTable {
        table,
        order,
        cache,
    };
    let mut call = prepare_base_call(base, &S::SLOTS, sam, &assigned, params, grads)?;
    let (restart, gsam) = (call.restart, call.gsam);
    let counted = kind.counts_steps() && !call.prepared.names.is_empty();
    let t = *steps + u64::from(counted);
    let since = *since_hessian + u64::from(counted);
    let refresh_hessian = *kind == LayerKind::Sophia && since >= *hessian_update_freq;
    let specs: Vec<GroupStep<S>> = groups
        .iter()
        .map(|hyper| GroupStep {
            spec: S::at_step(
                &LayerHyper {
                    refresh_hessian,
                    ..*hyper
                },
                t,
            ),
            l2: 0.0,
        })
        .collect();
    let clipping = *clipping;
    let mix = gsam.is_some();
    let count_items = call.prepared.names.len();
    let items = call.prepared.lanes(
        |e| layer_lanes::<f32, N>(e, restart, mix, S::MIN_AXES, S::CHANNELS),
        |e| layer_lanes::<f64, N>(e, restart, mix, S::MIN_AXES, S::CHANNELS),
    );
    let outcome =
        py.detach(move || layerwise::layer_step(items, count_items, &specs, clipping, gsam));
    if let Err(error) = outcome {
        return Err(call.fail(error));
    }
    call.commit();
    *steps = t;
    *since_hessian = if refresh_hessian { 0 } else { since };
    Ok(())
}

/// A layer-wise optimizer's step (with SAM's part when it is SAM's second step).
pub(super) fn layer_step(
    py: Python<'_>,
    base: &mut LayerEngine,
    sam: Option<SamPart<'_>>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
) -> PyResult<()> {
    match base.kind {
        LayerKind::Lamb => layer_step_of::<2, Lamb>(py, base, sam, params, grads),
        LayerKind::Lars => layer_step_of::<1, Lars>(py, base, sam, params, grads),
        LayerKind::Sophia => layer_step_of::<2, Sophia>(py, base, sam, params, grads),
        LayerKind::AdamP => layer_step_of::<2, AdamP>(py, base, sam, params, grads),
    }
}

fn hessian_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> HessianLanes<'a, T> {
    let group = entry.group / 2;
    let (_, estimate, states) = entry.lanes();
    let h = states.into_iter().next().expect("the Hessian EMA");
    (h, estimate.expect("an estimate per parameter"), group)
}

/// Sophia's Hessian-diagonal EMA from the caller's estimates: `h ← β2·h + (1−β2)·ĥ` for
/// every parameter of `params` (`estimates` has one array per name, like gradients).
#[pyfunction]
fn update_hessian(
    py: Python<'_>,
    engine: &Bound<'_, LayerEngine>,
    params: &Bound<'_, PyDict>,
    estimates: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let mut guard = engine.try_borrow_mut().map_err(|_| super::engine::busy())?;
    let base = &mut *guard;
    if base.kind != LayerKind::Sophia {
        let message = "update_hessian is SophiaOptimizer's".to_owned();
        return Err(optimizer_error("update_hessian", message));
    }
    let uses = [Use {
        table: 0,
        slot: 1,
        prefix: Sophia::SLOTS[1],
        policy: Policy::Lazy,
    }];
    let LayerEngine {
        groups,
        assign,
        since_hessian,
        table,
        order,
        cache,
        ..
    } = base;
    let mut tables = [TableRef { table, cache }];
    let assigned = Groups {
        assign: assign.as_ref().map(|assign| assign.bind(py)),
        count: 2 * groups.len(),
    };
    let mut prepared = prepare(
        params,
        Some(order),
        Some(estimates),
        &mut tables,
        &uses,
        None,
        &assigned,
    )?;
    let beta2: Vec<f64> = groups.iter().map(|g| g.base.beta2).collect();
    let items = prepared.lanes(hessian_lanes::<f32>, hessian_lanes::<f64>);
    if let Err(error) = py.detach(move || layerwise::sophia_hessian(items, &beta2)) {
        let error = prepared.norm_error(error);
        prepared.release(&mut tables);
        return Err(error);
    }
    prepared.commit(&mut tables);
    *since_hessian = 0;
    Ok(())
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<LayerEngine>()?;
    module.add_function(wrap_pyfunction!(update_hessian, module)?)?;
    Ok(())
}
