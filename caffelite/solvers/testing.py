"""Testing during training: every test net averaged over its ``test_iter`` batches, and the log
lines of a net's outputs (test results and the training display).

``SolverTesting`` is a base of ``Solver`` (base.py). A request to stop or to
snapshot is acted on between test batches, as in Caffe.
"""
from __future__ import annotations

import logging

from ..backend import to_numpy
from ..log import g
from ..net import Net

log = logging.getLogger(__name__)


class SolverTesting:
    """``test_all`` / ``test`` of a ``Solver``, and the logging of net outputs."""

    def test_all(self) -> None:
        self._drain_losses()
        self.test_results = []
        for test_net_id in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(test_net_id)

    def test(self, test_net_id: int = 0) -> list[tuple[str, float, float]] | None:
        """Average every output of a test net over test_iter batches and log them."""
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        n_iter = self.param.test_iter[test_net_id]
        # On a GPU (defer_loss) the loss sum is a device array, made by the first batch.
        scores, loss = None, (None if self.defer_loss else self._dt(0))
        for _ in range(n_iter):
            snapshot_asked, stop_asked = self.take_requests()
            while snapshot_asked or stop_asked:
                if snapshot_asked:
                    self.snapshot()
                if stop_asked:
                    self.requested_early_exit = True
                snapshot_asked, stop_asked = self.take_requests()
            if self.requested_early_exit:
                break
            if self.defer_loss:  # GPU: sums stay on the device, read once after the last batch
                iter_loss = net.forward(host_loss=False)
                values = [b.data.ravel() for b in net.output_blobs]
            else:
                iter_loss = net.forward()
                values = [b.cpu_data().ravel() for b in net.output_blobs]
            if self.param.test_compute_loss:
                if self.defer_loss:
                    loss = iter_loss.astype(self.dtype) if loss is None else loss + iter_loss
                else:
                    loss += self._dt(iter_loss)
            if scores is None:
                scores = [v.astype(self.dtype, copy=True) for v in values]
            else:
                for s, v in zip(scores, values):
                    s += v
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return None
        if self.defer_loss:
            scores = [to_numpy(s) for s in scores] if scores is not None else None
            loss = self._dt(0) if loss is None else self._dt(to_numpy(loss))
        if self.param.test_compute_loss:
            loss /= self._dt(n_iter)
            log.info("Test loss: %s", g(loss))
        results = self._log_outputs(net, scores or [], "Test", n_iter)
        self.test_results.append(results)
        self._call("on_test", test_net_id, results)
        return results

    def _log_outputs(self, net: Net, values: list, kind: str, divisor: int) -> list:
        out, index = [], 0
        for name, array in zip(net.output_blob_names, values):
            weight = self._dt(net.blob_loss_weights.get(name, 0.0))
            for value in array:
                value = self._dt(value) / self._dt(divisor) if divisor != 1 else self._dt(value)
                suffix = f" (* {g(weight)} = {g(weight * value)} loss)" if weight else ""
                log.info("    %s net output #%d: %s = %s%s", kind, index, name, g(value), suffix)
                out.append((name, float(value), float(weight)))
                index += 1
        return out


__all__ = ["SolverTesting"]
