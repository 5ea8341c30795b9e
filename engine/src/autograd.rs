//! A minimal reverse-mode autograd: a tape of recorded ops over pooled buffers.
//!
//! # Model
//! - Parameters ([`Param`]) live outside the tape (in the model); ops refer to them by index
//!   into the `&[Param<T>]` slice passed to every call. `backward` writes `Param::grad`
//!   (overwriting the previous step's gradient, summing when a parameter is used twice).
//! - Activations are tape *values*. A [`ValueId`] is a handle: ops **consume** their input
//!   handles (fan-out needs an explicit [`Tape::share`]), so the tape knows when nothing but
//!   backward can still read a buffer. A value's data is returned to the buffer pool as soon as
//!   no handle refers to it and no recorded backward needs it (e.g. the batch-norm output once
//!   relu has read it: relu backward uses its own output, batch-norm backward its input).
//! - [`Tape::backward`] walks the recorded nodes in reverse. Gradients that reach a value from
//!   several consumers are summed; a value's gradient buffer is recycled as soon as the node that
//!   produced the value has consumed it (leaf gradients are kept for [`Tape::grad`]).
//! - `on_grad_ready(param_index, grad)` is called the moment a parameter's gradient is final,
//!   i.e. right after the backward of the first (in forward order) op that used it. Parameters
//!   no recorded op used get no call and keep their old gradient.
//! - Buffers come from a pool keyed by length; [`Tape::reset`] returns everything to it, so a
//!   training loop with a fixed batch size allocates only during its first step.
//!   [`Tape::clear_pool`] gives the memory back (e.g. when the batch size changes).
//!
//! ```
//! use engine::autograd::{Param, Tape};
//! // A 2-layer MLP sharing nothing: x[2,3] -> linear(W1,b1) -> relu -> linear(W2) -> CE.
//! let mut params = vec![
//!     Param::new("w1", &[4, 3], vec![0.1f64; 12]),
//!     Param::new("b1", &[4], vec![0.0; 4]),
//!     Param::new("w2", &[2, 4], vec![0.2, -0.1, 0.3, 0.0, -0.2, 0.1, 0.0, 0.4]),
//! ];
//! let mut tape = Tape::<f64>::new();
//! tape.reset();
//! let x = tape.leaf(&[2, 3], &[1.0, 2.0, 3.0, -1.0, 0.5, 0.0], false);
//! let h = tape.linear(&params, x, 0, Some(1));
//! let h = tape.relu(h);
//! let logits = tape.linear(&params, h, 2, None);
//! let (loss, loss_value) = tape.cross_entropy(logits, &[0, 1]);
//! let mut ready = Vec::new();
//! tape.backward(loss, &mut params, &mut |i, _grad| ready.push(i));
//! assert_eq!(ready, vec![2, 0, 1]); // w2 first; w1 and b1 when the first linear is done
//! assert!(loss_value > 0.0 && params[0].grad.iter().any(|g| *g != 0.0));
//! ```

use std::collections::HashMap;

use crate::ops;
use crate::tensor::numel;
use crate::Float;

/// A trainable tensor: PyTorch state-dict name, shape, value and gradient (same length).
#[derive(Clone, Debug)]
pub struct Param<T> {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<T>,
    pub grad: Vec<T>,
}

impl<T: Float> Param<T> {
    /// A parameter with the given value and a zero gradient.
    pub fn new(name: impl Into<String>, shape: &[usize], value: Vec<T>) -> Self {
        assert_eq!(numel(shape), value.len(), "param value/shape mismatch");
        let grad = vec![T::zero(); value.len()];
        Param {
            name: name.into(),
            shape: shape.to_vec(),
            value,
            grad,
        }
    }
    pub fn numel(&self) -> usize {
        self.value.len()
    }
}

/// A handle to a tape value. Not `Clone`: ops consume it; use [`Tape::share`] for fan-out.
#[derive(Debug)]
#[must_use = "a dropped handle keeps its buffer alive until Tape::reset; pass it to an op or Tape::release"]
pub struct ValueId(usize);

/// Batch-norm statistics mode for [`Tape::batchnorm2d`].
pub enum BnMode<'a, T> {
    /// Normalize with batch statistics and update the running ones (PyTorch `train()`).
    Train {
        running_mean: &'a mut [T],
        running_var: &'a mut [T],
        momentum: f64,
    },
    /// Normalize with the running statistics (PyTorch `eval()`); not differentiable here:
    /// only allowed while gradients are disabled.
    Eval {
        running_mean: &'a [T],
        running_var: &'a [T],
    },
}

/// Batch-norm epsilon (PyTorch default).
pub const BN_EPS: f64 = 1e-5;

struct Slot<T> {
    shape: Vec<usize>,
    data: Option<Vec<T>>,
    grad: Option<Vec<T>>,
    /// Live [`ValueId`] handles.
    handles: usize,
    /// Recorded nodes whose backward still reads `data`.
    saved: usize,
    requires_grad: bool,
    is_leaf: bool,
}

enum Node<T> {
    Conv2d {
        geom: ops::Conv2dGeom,
        x: usize,
        y: usize,
        w: usize,
        b: Option<usize>,
    },
    BatchNorm2d {
        n: usize,
        c: usize,
        hw: usize,
        x: usize,
        y: usize,
        gamma: usize,
        beta: usize,
        mean: Vec<T>,
        invstd: Vec<T>,
    },
    Relu {
        y: usize,
        x: usize,
    },
    MaxPool2d {
        geom: ops::Pool2dGeom,
        x: usize,
        y: usize,
        argmax: Vec<u32>,
    },
    Linear {
        n: usize,
        d_in: usize,
        d_out: usize,
        x: usize,
        y: usize,
        w: usize,
        b: Option<usize>,
    },
    CrossEntropy {
        n: usize,
        classes: usize,
        logits: usize,
        loss: usize,
        probs: Vec<T>,
        labels: Vec<u32>,
    },
}

/// Op name and output slot of a node.
fn node_info<T>(node: &Node<T>) -> (&'static str, usize) {
    match node {
        Node::Conv2d { y, .. } => ("conv2d", *y),
        Node::BatchNorm2d { y, .. } => ("batchnorm2d", *y),
        Node::Relu { y, .. } => ("relu", *y),
        Node::MaxPool2d { y, .. } => ("maxpool2d", *y),
        Node::Linear { y, .. } => ("linear", *y),
        Node::CrossEntropy { loss, .. } => ("cross_entropy", *loss),
    }
}

/// Free buffers keyed by length (contents are stale: every user overwrites them).
struct Pool<E> {
    free: HashMap<usize, Vec<Vec<E>>>,
    /// Buffers ever allocated (not served from the free lists).
    fresh: usize,
}

impl<E: Copy + Default> Pool<E> {
    fn new() -> Self {
        Pool {
            free: HashMap::new(),
            fresh: 0,
        }
    }
    fn take(&mut self, len: usize) -> Vec<E> {
        match self.free.get_mut(&len).and_then(|v| v.pop()) {
            Some(buf) => buf,
            None => {
                self.fresh += 1;
                vec![E::default(); len]
            }
        }
    }
    fn give(&mut self, buf: Vec<E>) {
        self.free.entry(buf.len()).or_default().push(buf);
    }
    fn clear(&mut self) {
        self.free.clear();
    }
}

/// Accumulated wall time of one recorded node (see [`Tape::set_profiling`]).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeProfile {
    pub op: &'static str,
    pub out_shape: Vec<usize>,
    pub forward_ms: f64,
    pub backward_ms: f64,
}

/// The tape: recorded nodes, value slots and the buffer pools.
pub struct Tape<T: Float> {
    slots: Vec<Slot<T>>,
    nodes: Vec<Node<T>>,
    pool: Pool<T>,
    index_pool: Pool<u32>,
    grad_enabled: bool,
    /// Per parameter index: recorded uses not yet back-propagated.
    param_pending: Vec<usize>,
    /// Per parameter index: whether this backward already wrote its gradient.
    param_written: Vec<bool>,
    profiling: bool,
    /// When the previous node was recorded (forward time of a node = time since then).
    profile_mark: Option<std::time::Instant>,
    profile: Vec<NodeProfile>,
}

impl<T: Float> Default for Tape<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Disjoint mutable borrows of two parameters' gradients.
fn two_grads<T>(params: &mut [Param<T>], i: usize, j: usize) -> (&mut [T], &mut [T]) {
    assert_ne!(i, j, "an op cannot use the same parameter twice");
    if i < j {
        let (a, b) = params.split_at_mut(j);
        (&mut a[i].grad, &mut b[0].grad)
    } else {
        let (a, b) = params.split_at_mut(i);
        (&mut b[0].grad, &mut a[j].grad)
    }
}

impl<T: Float> Tape<T> {
    pub fn new() -> Self {
        Tape {
            slots: Vec::new(),
            nodes: Vec::new(),
            pool: Pool::new(),
            index_pool: Pool::new(),
            grad_enabled: true,
            param_pending: Vec::new(),
            param_written: Vec::new(),
            profiling: false,
            profile_mark: None,
            profile: Vec::new(),
        }
    }

    /// Starts a new forward pass: forgets all nodes and values and recycles their buffers.
    pub fn reset(&mut self) {
        for slot in self.slots.drain(..) {
            if let Some(d) = slot.data {
                self.pool.give(d);
            }
            if let Some(g) = slot.grad {
                self.pool.give(g);
            }
        }
        for node in self.nodes.drain(..) {
            match node {
                Node::BatchNorm2d { mean, invstd, .. } => {
                    self.pool.give(mean);
                    self.pool.give(invstd);
                }
                Node::MaxPool2d { argmax, .. } => self.index_pool.give(argmax),
                Node::CrossEntropy { probs, .. } => self.pool.give(probs),
                _ => {}
            }
        }
        self.param_pending.iter_mut().for_each(|c| *c = 0);
        if self.profiling {
            self.profile_mark = Some(std::time::Instant::now());
        }
    }

    /// Per-node timing (accumulated over steps until [`Tape::take_profile`]): a node's forward
    /// time is measured from the previous node's recording (or `reset`), so it includes any
    /// leaf copy in between. For benchmarks; off by default.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        self.profile_mark = on.then(std::time::Instant::now);
    }

    /// The accumulated per-node profile (in recording order), cleared.
    pub fn take_profile(&mut self) -> Vec<NodeProfile> {
        std::mem::take(&mut self.profile)
    }

    fn push_node(&mut self, node: Node<T>) {
        if self.profiling {
            let now = std::time::Instant::now();
            let i = self.nodes.len();
            if self.profile.len() <= i {
                let (op, out) = node_info(&node);
                self.profile.push(NodeProfile {
                    op,
                    out_shape: self.slots[out].shape.clone(),
                    forward_ms: 0.0,
                    backward_ms: 0.0,
                });
            }
            if let Some(mark) = self.profile_mark {
                self.profile[i].forward_ms += (now - mark).as_secs_f64() * 1e3;
            }
            self.profile_mark = Some(now);
        }
        self.nodes.push(node);
    }

    /// [`Tape::reset`] and free the pooled memory.
    pub fn clear_pool(&mut self) {
        self.reset();
        self.pool.clear();
        self.index_pool.clear();
    }

    /// Number of buffers this tape has allocated so far (not reused from its pool): constant
    /// across steps of a fixed batch size once the first step ran.
    pub fn fresh_allocations(&self) -> usize {
        self.pool.fresh + self.index_pool.fresh
    }

    /// When disabled, ops record nothing and keep no buffers for backward (inference).
    pub fn set_grad_enabled(&mut self, enabled: bool) {
        self.grad_enabled = enabled;
    }
    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    fn new_slot(&mut self, shape: Vec<usize>, requires_grad: bool, is_leaf: bool) -> usize {
        let data = self.pool.take(numel(&shape));
        self.slots.push(Slot {
            shape,
            data: Some(data),
            grad: None,
            handles: 1,
            saved: 0,
            requires_grad: requires_grad && self.grad_enabled,
            is_leaf,
        });
        self.slots.len() - 1
    }

    fn maybe_free_data(&mut self, v: usize) {
        let slot = &mut self.slots[v];
        if slot.handles == 0 && slot.saved == 0 {
            if let Some(d) = slot.data.take() {
                self.pool.give(d);
            }
        }
    }

    /// Drops a handle (its buffer is recycled if nothing else needs it).
    pub fn release(&mut self, v: ValueId) {
        self.slots[v.0].handles -= 1;
        self.maybe_free_data(v.0);
    }

    /// A second handle to the same value (fan-out); gradients from both uses are summed.
    pub fn share(&mut self, v: &ValueId) -> ValueId {
        self.slots[v.0].handles += 1;
        ValueId(v.0)
    }

    /// A new leaf value holding a copy of `data`. `requires_grad` leaves keep their gradient
    /// after backward ([`Tape::grad`]).
    pub fn leaf(&mut self, shape: &[usize], data: &[T], requires_grad: bool) -> ValueId {
        assert_eq!(numel(shape), data.len(), "leaf data/shape mismatch");
        let v = self.new_slot(shape.to_vec(), requires_grad, true);
        self.slots[v].data.as_mut().unwrap().copy_from_slice(data);
        ValueId(v)
    }

    pub fn shape(&self, v: &ValueId) -> &[usize] {
        &self.slots[v.0].shape
    }

    /// The value's data (alive as long as a handle is).
    pub fn data(&self, v: &ValueId) -> &[T] {
        self.slots[v.0]
            .data
            .as_deref()
            .expect("a value with a live handle keeps its data")
    }

    /// The gradient of a leaf after backward (`None` if no gradient reached it).
    pub fn grad(&self, v: &ValueId) -> Option<&[T]> {
        self.slots[v.0].grad.as_deref()
    }

    /// Consumes input handle `x`; records that backward reads its data if `save`.
    fn consume_input(&mut self, x: ValueId, save: bool) -> usize {
        let v = x.0;
        self.slots[v].handles -= 1;
        if save {
            self.slots[v].saved += 1;
        }
        v
    }

    fn note_param_use(&mut self, p: usize) {
        if self.param_pending.len() <= p {
            self.param_pending.resize(p + 1, 0);
            self.param_written.resize(p + 1, false);
        }
        self.param_pending[p] += 1;
    }

    fn record(&self) -> bool {
        self.grad_enabled
    }

    /// 2-D convolution (`x: [N, C_in, H, W]`, `w: [C_out, C_in, KH, KW]`, optional bias).
    pub fn conv2d(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        w: usize,
        b: Option<usize>,
        stride: usize,
        pad: usize,
    ) -> ValueId {
        let xs = &self.slots[x.0].shape;
        let ws = &params[w].shape;
        assert!(
            xs.len() == 4 && ws.len() == 4 && xs[1] == ws[1],
            "conv2d shapes {xs:?} {ws:?}"
        );
        let geom = ops::Conv2dGeom {
            n: xs[0],
            c_in: xs[1],
            h: xs[2],
            w: xs[3],
            c_out: ws[0],
            kh: ws[2],
            kw: ws[3],
            stride,
            pad,
        };
        let out_shape = vec![geom.n, geom.c_out, geom.out_h(), geom.out_w()];
        let y = self.new_slot(out_shape, true, false);
        let x_idx = x.0;
        {
            let mut yd = self.slots[y].data.take().unwrap();
            let xd = self.slots[x_idx].data.as_deref().unwrap();
            ops::conv2d_forward(
                &geom,
                xd,
                &params[w].value,
                b.map(|b| &params[b].value[..]),
                &mut yd,
            );
            self.slots[y].data = Some(yd);
        }
        let record = self.record();
        let x = self.consume_input(x, record);
        if record {
            self.note_param_use(w);
            if let Some(b) = b {
                self.note_param_use(b);
            }
            self.push_node(Node::Conv2d { geom, x, y, w, b });
        }
        self.maybe_free_data(x);
        ValueId(y)
    }

    /// Batch norm over channels of `x: [N, C, H, W]` with affine `gamma`, `beta`.
    pub fn batchnorm2d(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        gamma: usize,
        beta: usize,
        mode: BnMode<'_, T>,
    ) -> ValueId {
        let xs = self.slots[x.0].shape.clone();
        assert!(
            xs.len() == 4,
            "batchnorm2d expects [N, C, H, W], got {xs:?}"
        );
        let (n, c, hw) = (xs[0], xs[1], xs[2] * xs[3]);
        let y = self.new_slot(xs, true, false);
        let mut yd = self.slots[y].data.take().unwrap();
        let record = self.record();
        let xd = self.slots[x.0].data.as_deref().unwrap();
        match mode {
            BnMode::Train {
                running_mean,
                running_var,
                momentum,
            } => {
                let mut mean = self.pool.take(c);
                let mut invstd = self.pool.take(c);
                ops::batchnorm2d_forward_train(
                    n,
                    c,
                    hw,
                    xd,
                    &params[gamma].value,
                    &params[beta].value,
                    BN_EPS,
                    &mut yd,
                    &mut mean,
                    &mut invstd,
                );
                ops::batchnorm2d_update_running(
                    &mean,
                    &invstd,
                    BN_EPS,
                    n * hw,
                    momentum,
                    running_mean,
                    running_var,
                );
                self.slots[y].data = Some(yd);
                let x = self.consume_input(x, record);
                if record {
                    self.note_param_use(gamma);
                    self.note_param_use(beta);
                    self.push_node(Node::BatchNorm2d {
                        n,
                        c,
                        hw,
                        x,
                        y,
                        gamma,
                        beta,
                        mean,
                        invstd,
                    });
                } else {
                    self.pool.give(mean);
                    self.pool.give(invstd);
                }
                self.maybe_free_data(x);
            }
            BnMode::Eval {
                running_mean,
                running_var,
            } => {
                assert!(
                    !record,
                    "eval-mode batch norm is not differentiable here: disable gradients"
                );
                ops::batchnorm2d_forward_eval(
                    n,
                    c,
                    hw,
                    xd,
                    &params[gamma].value,
                    &params[beta].value,
                    running_mean,
                    running_var,
                    BN_EPS,
                    &mut yd,
                );
                self.slots[y].data = Some(yd);
                let x = self.consume_input(x, false);
                self.maybe_free_data(x);
            }
        }
        ValueId(y)
    }

    /// `max(x, 0)`; backward uses the output, so the input can be freed.
    pub fn relu(&mut self, x: ValueId) -> ValueId {
        let shape = self.slots[x.0].shape.clone();
        let y = self.new_slot(shape, true, false);
        let mut yd = self.slots[y].data.take().unwrap();
        ops::relu_forward(self.slots[x.0].data.as_deref().unwrap(), &mut yd);
        self.slots[y].data = Some(yd);
        let record = self.record();
        let x = self.consume_input(x, false);
        if record {
            self.slots[y].saved += 1;
            self.push_node(Node::Relu { y, x });
        }
        self.maybe_free_data(x);
        ValueId(y)
    }

    /// Max pooling with a `k×k` window and the given stride, no padding.
    pub fn maxpool2d(&mut self, x: ValueId, k: usize, stride: usize) -> ValueId {
        let xs = &self.slots[x.0].shape;
        assert!(xs.len() == 4, "maxpool2d expects [N, C, H, W], got {xs:?}");
        let geom = ops::Pool2dGeom {
            n: xs[0],
            c: xs[1],
            h: xs[2],
            w: xs[3],
            k,
            stride,
        };
        let out_shape = vec![geom.n, geom.c, geom.out_h(), geom.out_w()];
        let out_len = numel(&out_shape);
        let y = self.new_slot(out_shape, true, false);
        let mut yd = self.slots[y].data.take().unwrap();
        let mut argmax = self.index_pool.take(out_len);
        ops::maxpool2d_forward(
            &geom,
            self.slots[x.0].data.as_deref().unwrap(),
            &mut yd,
            &mut argmax,
        );
        self.slots[y].data = Some(yd);
        let record = self.record();
        let x = self.consume_input(x, false);
        if record {
            self.push_node(Node::MaxPool2d { geom, x, y, argmax });
        } else {
            self.index_pool.give(argmax);
        }
        self.maybe_free_data(x);
        ValueId(y)
    }

    /// Fully connected layer; `x: [N, ...]` is flattened to `[N, d_in]` (PyTorch's
    /// `view(N, -1)`), `w: [d_out, d_in]`.
    pub fn linear(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        w: usize,
        b: Option<usize>,
    ) -> ValueId {
        let xs = &self.slots[x.0].shape;
        let n = xs[0];
        let d_in = numel(&xs[1..]);
        let ws = &params[w].shape;
        assert!(
            ws.len() == 2 && ws[1] == d_in,
            "linear: x {xs:?} vs w {ws:?}"
        );
        let d_out = ws[0];
        let y = self.new_slot(vec![n, d_out], true, false);
        let mut yd = self.slots[y].data.take().unwrap();
        ops::linear_forward(
            n,
            d_in,
            d_out,
            self.slots[x.0].data.as_deref().unwrap(),
            &params[w].value,
            b.map(|b| &params[b].value[..]),
            &mut yd,
        );
        self.slots[y].data = Some(yd);
        let record = self.record();
        let x = self.consume_input(x, record);
        if record {
            self.note_param_use(w);
            if let Some(b) = b {
                self.note_param_use(b);
            }
            self.push_node(Node::Linear {
                n,
                d_in,
                d_out,
                x,
                y,
                w,
                b,
            });
        }
        self.maybe_free_data(x);
        ValueId(y)
    }

    /// Mean cross-entropy of `logits: [N, classes]` against `labels` (each `< classes`;
    /// callers validate). Returns the scalar loss value and its number.
    pub fn cross_entropy(&mut self, logits: ValueId, labels: &[u32]) -> (ValueId, T) {
        let ls = &self.slots[logits.0].shape;
        assert!(
            ls.len() == 2 && ls[0] == labels.len(),
            "cross_entropy: {ls:?} vs {} labels",
            labels.len()
        );
        let (n, classes) = (ls[0], ls[1]);
        let mut probs = self.pool.take(n * classes);
        let loss_value = ops::cross_entropy_forward(
            n,
            classes,
            self.slots[logits.0].data.as_deref().unwrap(),
            labels,
            &mut probs,
        );
        let loss = self.new_slot(Vec::new(), true, false);
        self.slots[loss].data.as_mut().unwrap()[0] = loss_value;
        let record = self.record();
        let logits = self.consume_input(logits, false);
        if record {
            self.push_node(Node::CrossEntropy {
                n,
                classes,
                logits,
                loss,
                probs,
                labels: labels.to_vec(),
            });
        } else {
            self.pool.give(probs);
        }
        self.maybe_free_data(logits);
        (ValueId(loss), loss_value)
    }

    /// Adds a freshly computed gradient for value `v`: the first contribution is written in
    /// place, later ones (fan-out) are computed into a scratch buffer and summed.
    fn accumulate(&mut self, v: usize, compute: impl FnOnce(&Self, &mut [T])) {
        let len = numel(&self.slots[v].shape);
        match self.slots[v].grad.take() {
            None => {
                let mut g = self.pool.take(len);
                compute(self, &mut g);
                self.slots[v].grad = Some(g);
            }
            Some(mut g) => {
                let mut tmp = self.pool.take(len);
                compute(self, &mut tmp);
                g.iter_mut().zip(&tmp).for_each(|(a, b)| *a += *b);
                self.pool.give(tmp);
                self.slots[v].grad = Some(g);
            }
        }
    }

    /// Hands a computed gradient buffer to value `v`: it becomes `v`'s gradient (no copy) or,
    /// on fan-out, is summed into the existing one and recycled.
    fn deliver_grad(&mut self, v: usize, buf: Vec<T>) {
        match self.slots[v].grad.take() {
            None => self.slots[v].grad = Some(buf),
            Some(mut g) => {
                g.iter_mut().zip(&buf).for_each(|(a, b)| *a += *b);
                self.pool.give(buf);
                self.slots[v].grad = Some(g);
            }
        }
    }

    /// Writes one op's gradients for parameter `p1` (and `p2`): directly into `Param::grad`
    /// when this backward has not written them yet, else into scratch that is then summed
    /// (a parameter used by several ops).
    fn write_param_grads(
        &mut self,
        params: &mut [Param<T>],
        p1: usize,
        p2: Option<usize>,
        compute: impl FnOnce(&Self, &mut [T], Option<&mut [T]>),
    ) {
        let fresh = !self.param_written[p1] && p2.is_none_or(|p| !self.param_written[p]);
        if fresh {
            match p2 {
                Some(p2) => {
                    let (g1, g2) = two_grads(params, p1, p2);
                    compute(self, g1, Some(g2));
                }
                None => compute(self, &mut params[p1].grad, None),
            }
        } else {
            let mut t1 = self.pool.take(params[p1].numel());
            let mut t2 = p2.map(|p| self.pool.take(params[p].numel()));
            compute(self, &mut t1, t2.as_deref_mut());
            let mut merge = |tape: &mut Self, p: usize, t: Vec<T>| {
                let g = &mut params[p].grad;
                if tape.param_written[p] {
                    g.iter_mut().zip(&t).for_each(|(a, b)| *a += *b);
                } else {
                    g.copy_from_slice(&t);
                }
                tape.pool.give(t);
            };
            merge(self, p1, t1);
            if let (Some(p2), Some(t2)) = (p2, t2) {
                merge(self, p2, t2);
            }
        }
        self.param_written[p1] = true;
        if let Some(p2) = p2 {
            self.param_written[p2] = true;
        }
    }

    fn param_done(&mut self, params: &[Param<T>], p: usize, hook: &mut dyn FnMut(usize, &[T])) {
        self.param_pending[p] -= 1;
        if self.param_pending[p] == 0 {
            hook(p, &params[p].grad);
        }
    }

    fn unsave(&mut self, v: usize) {
        self.slots[v].saved -= 1;
        self.maybe_free_data(v);
    }

    /// Back-propagates from the scalar `loss` (seed gradient 1) through every recorded node,
    /// writing parameter gradients and calling `on_grad_ready` as each becomes final.
    pub fn backward(
        &mut self,
        loss: ValueId,
        params: &mut [Param<T>],
        on_grad_ready: &mut dyn FnMut(usize, &[T]),
    ) {
        assert!(
            self.slots[loss.0].shape.is_empty(),
            "backward needs a scalar loss"
        );
        let mut seed = self.pool.take(1);
        seed[0] = T::one();
        if let Some(old) = self.slots[loss.0].grad.replace(seed) {
            self.pool.give(old);
        }
        self.release(loss);
        self.param_written.iter_mut().for_each(|w| *w = false);
        let nodes = std::mem::take(&mut self.nodes);
        let mut done_nodes = Vec::with_capacity(nodes.len());
        let n_nodes = nodes.len();
        for (rev_i, node) in nodes.into_iter().rev().enumerate() {
            let node_start = self.profiling.then(std::time::Instant::now);
            // The output's gradient (zeros if it did not reach the loss).
            let out = node_info(&node).1;
            let mut dy = match self.slots[out].grad.take() {
                Some(g) => g,
                None => {
                    let mut g = self.pool.take(numel(&self.slots[out].shape));
                    g.iter_mut().for_each(|v| *v = T::zero());
                    g
                }
            };
            match &node {
                Node::Conv2d { geom, x, w, b, .. } => {
                    let (x, w, b) = (*x, *w, *b);
                    self.write_param_grads(params, w, b, |t, gw, gb| {
                        ops::conv2d_backward_weight(
                            geom,
                            t.slots[x].data.as_deref().unwrap(),
                            &dy,
                            gw,
                            gb,
                        )
                    });
                    self.unsave(x);
                    self.param_done(params, w, on_grad_ready);
                    if let Some(b) = b {
                        self.param_done(params, b, on_grad_ready);
                    }
                    if self.slots[x].requires_grad {
                        let wv = &params[w].value;
                        self.accumulate(x, |_, g| ops::conv2d_backward_data(geom, &dy, wv, g));
                    }
                }
                Node::BatchNorm2d {
                    n,
                    c,
                    hw,
                    x,
                    gamma,
                    beta,
                    mean,
                    invstd,
                    ..
                } => {
                    let (x, gamma, beta) = (*x, *gamma, *beta);
                    let mut dx = self.pool.take(n * c * hw);
                    let mut gamma_value = self.pool.take(*c);
                    gamma_value.copy_from_slice(&params[gamma].value);
                    self.write_param_grads(params, gamma, Some(beta), |t, gg, gb| {
                        ops::batchnorm2d_backward(
                            *n,
                            *c,
                            *hw,
                            t.slots[x].data.as_deref().unwrap(),
                            &gamma_value,
                            mean,
                            invstd,
                            &dy,
                            &mut dx,
                            gg,
                            gb.expect("beta grad"),
                        )
                    });
                    self.pool.give(gamma_value);
                    self.unsave(x);
                    self.param_done(params, gamma, on_grad_ready);
                    self.param_done(params, beta, on_grad_ready);
                    if self.slots[x].requires_grad {
                        self.deliver_grad(x, dx);
                    } else {
                        self.pool.give(dx);
                    }
                }
                Node::Relu { y, x } => {
                    let (y, x) = (*y, *x);
                    if self.slots[x].requires_grad {
                        if self.slots[x].grad.is_none() {
                            // First contribution: mask dy in place and hand it over (saves a
                            // full activation-sized buffer at the peak).
                            let yd = self.slots[y].data.as_deref().unwrap();
                            // A select, not a branch: signs are random and mispredicts cost
                            // ~10 ns per element.
                            for (g, &yv) in dy.iter_mut().zip(yd) {
                                *g = if yv > T::zero() { *g } else { T::zero() };
                            }
                            self.slots[x].grad = Some(std::mem::take(&mut dy));
                        } else {
                            self.accumulate(x, |t, g| {
                                ops::relu_backward(t.slots[y].data.as_deref().unwrap(), &dy, g)
                            });
                        }
                    }
                    self.unsave(y);
                }
                Node::MaxPool2d {
                    geom, x, argmax, ..
                } => {
                    let x = *x;
                    if self.slots[x].requires_grad {
                        self.accumulate(x, |_, g| ops::maxpool2d_backward(geom, &dy, argmax, g));
                    }
                }
                Node::Linear {
                    n,
                    d_in,
                    d_out,
                    x,
                    w,
                    b,
                    ..
                } => {
                    let (x, w, b) = (*x, *w, *b);
                    let mut dw = self.pool.take(d_out * d_in);
                    let mut db = self.pool.take(*d_out);
                    let mut dx = if self.slots[x].requires_grad {
                        Some(self.pool.take(n * d_in))
                    } else {
                        None
                    };
                    ops::linear_backward(
                        *n,
                        *d_in,
                        *d_out,
                        self.slots[x].data.as_deref().unwrap(),
                        &params[w].value,
                        &dy,
                        dx.as_deref_mut(),
                        &mut dw,
                        b.map(|_| &mut db[..]),
                    );
                    self.write_param_grads(params, w, b, |_, gw, gb| {
                        gw.copy_from_slice(&dw);
                        if let Some(gb) = gb {
                            gb.copy_from_slice(&db);
                        }
                    });
                    self.pool.give(dw);
                    self.pool.give(db);
                    self.unsave(x);
                    self.param_done(params, w, on_grad_ready);
                    if let Some(b) = b {
                        self.param_done(params, b, on_grad_ready);
                    }
                    if let Some(dx) = dx {
                        self.deliver_grad(x, dx);
                    }
                }
                Node::CrossEntropy {
                    n,
                    classes,
                    logits,
                    probs,
                    labels,
                    ..
                } => {
                    let logits = *logits;
                    if self.slots[logits].requires_grad {
                        let dloss = dy[0];
                        self.accumulate(logits, |_, g| {
                            ops::cross_entropy_backward(*n, *classes, probs, labels, dloss, g)
                        });
                    }
                }
            }
            // The output's gradient is consumed; leaf outputs do not exist here.
            if !dy.is_empty() {
                self.pool.give(dy);
            }
            if let Some(t0) = node_start {
                if let Some(p) = self.profile.get_mut(n_nodes - 1 - rev_i) {
                    p.backward_ms += t0.elapsed().as_secs_f64() * 1e3;
                }
            }
            done_nodes.push(node);
        }
        // Keep the nodes' saved buffers for recycling by `reset` (in recording order).
        done_nodes.reverse();
        self.nodes = done_nodes;
        // Non-leaf gradients that never reached a producer (none in a connected graph) go back.
        for i in 0..self.slots.len() {
            if !self.slots[i].is_leaf {
                if let Some(g) = self.slots[i].grad.take() {
                    self.pool.give(g);
                }
            }
        }
    }
}
