//! Prodigy's native state (`ProdigyEngine`: its slots, step count and global estimate of
//! `d`) and its step, plain or as SAM's second step with the restore fused in: the same
//! driver and commit as the element-wise optimizers (`api`), with the one-pass phase of
//! `crate::prodigy`, whose sums give the next `d`, committed with the step. No arithmetic
//! lives here.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::api::{prepare_base_call, BaseTable, SamPart};
use super::arrays::{self, Float, NameOrder};
use super::driver::{Entry, EntryCache, Groups};
use super::engine::export_table;
use super::optimizer_error;
use super::statedict::StagedTable;
use crate::kernels::UpdateLanes;
use crate::phases::Clipping;
use crate::prodigy::{self, Estimate, ProdigyGroup, ProdigyHyper, Step, SLOTS};
use crate::state::Table;

/// The state-dict keys of the step count and of the estimate.
const STEP: &str = "step";
const D: &str = "d";
const D_MAX: &str = "d_max";
const NUMERATOR: &str = "d_numerator";

/// Prodigy's native state.
#[pyclass(module = "samopt._core")]
pub struct ProdigyEngine {
    hyper: ProdigyHyper,
    /// The optimizer's own `lr` and `weight_decay`, then each parameter group's.
    groups: Vec<ProdigyGroup>,
    assign: Option<Py<PyAny>>,
    clipping: Clipping,
    steps: u64,
    estimate: Estimate,
    table: Table,
    order: NameOrder,
    cache: EntryCache,
}

#[pymethods]
impl ProdigyEngine {
    /// `groups` holds `(lr, weight_decay)` for the optimizer itself, then for each
    /// parameter group; the rest is the optimizer's.
    #[new]
    #[pyo3(signature = (groups, *, beta1, beta2, beta3, epsilon, d0, d_coef, d_growth_rate, bias_correction, clip_value = None, clip_norm = None, assign = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        groups: Vec<(f64, f64)>,
        beta1: f64,
        beta2: f64,
        beta3: f64,
        epsilon: f64,
        d0: f64,
        d_coef: f64,
        d_growth_rate: f64,
        bias_correction: bool,
        clip_value: Option<f64>,
        clip_norm: Option<f64>,
        assign: Option<Py<PyAny>>,
    ) -> PyResult<ProdigyEngine> {
        if groups.is_empty() {
            let message = "an optimizer needs its own hyperparameters".to_owned();
            return Err(optimizer_error("groups", message));
        }
        let clipping = match (clip_value, clip_norm) {
            (Some(c), _) => Clipping::Value(c),
            (None, Some(c)) => Clipping::Norm(c),
            (None, None) => Clipping::Off,
        };
        let hyper = ProdigyHyper {
            beta1,
            beta2,
            beta3,
            epsilon,
            d0,
            d_coef,
            d_growth_rate,
            bias_correction,
        };
        Ok(ProdigyEngine {
            hyper,
            groups: groups
                .into_iter()
                .map(|(lr, weight_decay)| ProdigyGroup { lr, weight_decay })
                .collect(),
            assign,
            clipping,
            steps: 0,
            estimate: Estimate::initial(&hyper),
            table: Table::new(SLOTS.len()),
            order: NameOrder::default(),
            cache: EntryCache::default(),
        })
    }

    /// Each group's learning rate, the optimizer's own first.
    #[getter]
    fn lrs(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.lr).collect()
    }

    #[setter]
    fn set_lrs(&mut self, lrs: Vec<f64>) -> PyResult<()> {
        super::assign_lrs(&mut self.groups, lrs, |g| &mut g.lr)
    }

    #[getter]
    fn steps(&self) -> u64 {
        self.steps
    }

    #[getter]
    fn slots(&self) -> Vec<&'static str> {
        SLOTS.to_vec()
    }

    /// `(d, d_max, d_numerator)`.
    #[getter]
    fn estimate(&self) -> (f64, f64, f64) {
        let Estimate {
            d,
            d_max,
            numerator,
        } = self.estimate;
        (d, d_max, numerator)
    }

    /// Copies of the per-parameter state by key, `step`, `d`, `d_max` and `d_numerator`,
    /// put into `into` when given.
    #[pyo3(signature = (into = None))]
    fn state_dict<'py>(
        &self,
        py: Python<'py>,
        into: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = into.unwrap_or_else(|| PyDict::new(py));
        let step = arrays::array_from::<i64>(py, &[self.steps as i64], &[], false, STEP)?;
        out.set_item(STEP, step)?;
        let (d, d_max, numerator) = self.estimate();
        for (key, value) in [(D, d), (D_MAX, d_max), (NUMERATOR, numerator)] {
            out.set_item(
                key,
                arrays::array_from::<f64>(py, &[value], &[], false, key)?,
            )?;
        }
        export_table(py, &self.table, &SLOTS, None, &out, None)?;
        Ok(out)
    }

    /// Replaces the whole state (checked and copied before anything is replaced).
    fn load(
        &mut self,
        steps: u64,
        estimate: (f64, f64, f64),
        entries: &mut StagedTable,
    ) -> PyResult<()> {
        let table = entries.take()?;
        if table.slots() != SLOTS.len() {
            let message = format!("a state table needs {} slots", SLOTS.len());
            return Err(optimizer_error("state", message));
        }
        let (d, d_max, numerator) = estimate;
        self.table = table;
        self.steps = steps;
        self.estimate = Estimate {
            d,
            d_max,
            numerator,
        };
        Ok(())
    }
}

/// A step's lanes for one entry: the four slots, then SAM's saved values and GSAM's g0
/// when the step restarts from them.
fn lanes<'a, T: Float>(
    entry: &'a mut Entry<'_, T>,
    restart: bool,
    mix: bool,
) -> UpdateLanes<'a, T, 4> {
    let group = entry.group;
    let (param, grad, states) = entry.lanes();
    let mut states = states.into_iter();
    let slots: [&mut [T]; 4] = std::array::from_fn(|_| states.next().expect("one per slot"));
    let start = restart.then(|| &*states.next().expect("saved values"));
    let grad0 = mix.then(|| &*states.next().expect("GSAM's g0"));
    UpdateLanes {
        param,
        grad: grad.expect("a base step has gradients"),
        slots,
        start,
        grad0,
        group,
    }
}

/// Prodigy's step, plain or as SAM's second step (see `api::base_step_of`, which this
/// follows): commits the slots, the step count, the next estimate, SAM's pending set and
/// its call count.
pub(super) fn prodigy_step(
    py: Python<'_>,
    base: &mut ProdigyEngine,
    sam: Option<SamPart<'_>>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let ProdigyEngine {
        hyper,
        groups,
        assign,
        clipping,
        steps,
        estimate,
        table,
        order,
        cache,
    } = base;
    let assigned = Groups {
        assign: assign.as_ref().map(|assign| assign.bind(py)),
        count: groups.len(),
    };
    let base = BaseTable {
        table,
        order,
        cache,
    };
    let mut call = prepare_base_call(base, &SLOTS, sam, &assigned, params, grads)?;
    let (restart, gsam) = (call.restart, call.gsam);
    let counted = !call.prepared.names.is_empty();
    let t = *steps + u64::from(counted);
    let specs: Vec<Step> = groups
        .iter()
        .map(|group| Step::at(hyper, group, estimate, t))
        .collect();
    let clipping = *clipping;
    let mix = gsam.is_some();
    let items = call.prepared.lanes(
        |e| lanes::<f32>(e, restart, mix),
        |e| lanes::<f64>(e, restart, mix),
    );
    let outcome = py.detach(move || prodigy::prodigy_step(items, &specs, clipping, gsam));
    let sums = match outcome {
        Ok(sums) => sums,
        Err(error) => return Err(call.fail(error)),
    };
    call.commit();
    *steps = t;
    *estimate = estimate.next(hyper, sums);
    Ok(())
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<ProdigyEngine>()
}
