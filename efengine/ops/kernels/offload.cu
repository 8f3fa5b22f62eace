// Run-ahead offloaded decode (ops/gpu_runahead.py): the device checks residency itself.
//
// Legend: A active experts, E experts per layer.
//
// The host keeps the authoritative expert -> slot map in page-locked host memory (`mtab`, one row
// [E] a layer; -1: not resident), which the GPU reads over PCIe through its unified address. The
// host writes -1 there the moment it evicts an expert (before any copy may overwrite its slot); a
// slot number is written by `publish`, queued on the copy stream after the expert's bytes, so a
// number is never visible before the bytes it names have landed.
//
// `expert_gate` runs after each MoE router, in the same stream (and CUDA graph) as the layer:
//   1. with `forced` (trace replay) the router's ids / weights are replaced by the step's plan;
//   2. the ids and a sequence number (position + 1) are written to the host's log row, in that
//      order, so the host learns this layer's routing without a read-back on the stream;
//   3. every id's slot is read from mtab; a missing one is polled (with a short sleep) until the
//      host's copy publishes it: the GPU waits only here, and only for a layer that misses;
//   4. the slots go into the device slot table row the MoE kernels read.
// The time spent polling (globaltimer, ns) is added to *stall (host-mapped): the stall the bench reports.
// A poll that outlasts `timeout_ns` sets *err and gives up (the host raises): a host that died
// mid-step must not leave the GPU spinning forever.

extern "C" __global__ void expert_gate(int* ids, float* rw, const int* forced_ids, const float* forced_w,
                                       const volatile int* mtab, int* dtab, volatile int* log,
                                       const int* pos, volatile unsigned long long* stall, int* err, int A,
                                       long long timeout_ns) {
    const int lane = threadIdx.x;            // one warp; A <= 32
    int e = -1;
    if (lane < A) {
        if (forced_ids) {
            e = forced_ids[lane];
            ids[lane] = e;
            rw[lane] = forced_w[lane];
        } else {
            e = ids[lane];
        }
        log[lane] = e;
    }
    __threadfence_system();                  // the ids reach the host before the sequence number
    __syncwarp();
    if (lane == 0) log[A] = pos[0] + 1;
    __threadfence_system();
    unsigned long long t0 = 0, t1 = 0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    bool waited = false;
    if (lane < A) {
        int s = mtab[e];
        while (s < 0) {
            waited = true;
            __nanosleep(500);
            s = mtab[e];
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
            if ((long long)(t1 - t0) > timeout_ns) {
                atomicOr(err, 2);
                break;
            }
        }
        dtab[e] = s;
    }
    waited = __any_sync(0xffffffffu, waited);
    if (lane == 0 && waited) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
        *stall += t1 - t0;                   // gates run one at a time (one stream): no atomic,
    }                                        // which host memory over PCIe may not support
}

// One int written after everything queued before it on this stream (the copy stream): the slot
// number of an expert whose bytes just landed, into the host map.
extern "C" __global__ void publish(volatile int* dst, int value) {
    __threadfence_system();
    *dst = value;
    __threadfence_system();
}
