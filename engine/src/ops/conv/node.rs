//! conv2d's tape node and recording method (the kernels are beside it in `conv/`).
use super::{conv2d_backward_data, conv2d_backward_weight, conv2d_forward, Conv2dGeom};
use crate::autograd::{Param, ParamGrads, Tape, TapeNode, ValueId};
use crate::Float;

struct Conv2dNode {
    geom: Conv2dGeom,
    x: usize,
    y: usize,
    w: usize,
    b: Option<usize>,
}

impl<T: Float> TapeNode<T> for Conv2dNode {
    fn op(&self) -> &'static str {
        "conv2d"
    }
    fn output(&self) -> usize {
        self.y
    }
    fn backward(&self, tape: &mut Tape<T>, grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        let (geom, x, w) = (&self.geom, self.x, self.w);
        // Weight gradients first, so their ready hooks (DDP's all-reduce) fire before the
        // input gradient is computed.
        tape.write_param_grads(grads, w, self.b, |t, gw, gb| {
            conv2d_backward_weight(geom, t.value(x), dy, gw, gb)
        });
        tape.unsave(x);
        if tape.requires_grad(x) {
            let wv = &grads.params[w].value;
            tape.accumulate(x, |_, g| conv2d_backward_data(geom, dy, wv, g));
        }
    }
}

impl<T: Float> Tape<T> {
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
        let xs = self.shape(&x);
        let ws = &params[w].shape;
        assert!(
            xs.len() == 4 && ws.len() == 4 && xs[1] == ws[1],
            "conv2d shapes {xs:?} {ws:?}"
        );
        let geom = Conv2dGeom::new(
            xs[0],
            xs[1],
            xs[2],
            xs[3],
            ws[0],
            (ws[2], ws[3]),
            stride,
            pad,
        );
        let out_shape = vec![geom.n, geom.c_out, geom.out_h(), geom.out_w()];
        let y = self.new_output(out_shape, |t, yd| {
            let bias = b.map(|b| &params[b].value[..]);
            conv2d_forward(&geom, t.value(x.0), &params[w].value, bias, yd)
        });
        let record = self.record();
        let x = self.consume_input(x, record);
        if record {
            self.note_param_use(w);
            if let Some(b) = b {
                self.note_param_use(b);
            }
            self.push_node(Box::new(Conv2dNode { geom, x, y, w, b }));
        }
        self.maybe_free_data(x);
        ValueId(y)
    }
}
