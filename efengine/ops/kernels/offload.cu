// Run-ahead offloaded decode (ops/gpu_runahead.py): the device checks residency itself.
//
// Legend: A active experts, E experts per layer.
//
// The host keeps the authoritative expert -> slot map in page-locked host memory (`mtab`, one row
// [E] a layer; -1: not resident), which the GPU reads over PCIe through its unified address. The
// host writes -1 there the moment it evicts an expert (before any copy may overwrite its slot); a
// slot number is written on the copy stream after the expert's bytes (the driver's stream write,
// or the `publish` kernel where that is refused), so a number is never visible before the bytes
// it names have landed.
//
// `expert_gate` runs after each MoE router, in the same stream (and CUDA graph) as the layer:
//   1. with `forced` (trace replay) the router's ids / weights are replaced by the step's plan;
//   2. the ids (and, with `pred`, later layers' predicted router logits) and then a sequence
//      number (position + 1) are written to the host's log row, so the host learns this layer's
//      routing without a read-back on the stream;
//   3. phase A: every id's slot is read from mtab; missing ones are polled (with a short sleep)
//      until the copy stream publishes them: the GPU waits only here;
//   4. phase B: `progress` = 2*layer+1 ("this layer's kernels may read the slots I read"), then
//      the slots are read again; if one went missing meanwhile (an eviction raced us) the claim
//      is dropped (progress = 2*layer) and phase A runs again; else they go into the device
//      slot table row the MoE kernels read.
// The time spent polling (globaltimer, ns) is added to *stall (host-mapped).
// A poll that outlasts `timeout_ns` sets *err and gives up (the host raises): a host that died
// mid-step must not leave the GPU spinning forever.
//
// Why the claim makes evictions safe (the device may be layers ahead of the host, so a victim may
// belong to a layer it has reached): the host clears a victim's entry, then queues
// `slot_guard` before the copy into its slot; the guard waits while progress names the victim's
// layer as claimed. A slot value the gate used was read after its claim was visible and before
// the host's -1 was, so the guard (which runs after the -1) sees the claim, or a later gate's
// progress (that layer's kernels are then done). The guard never waits on a copy: a claim lasts
// one re-read plus the layer's kernels. `step_done` clears progress at the end of the step.

__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

extern "C" __global__ void expert_gate(int* ids, float* rw, const int* forced_ids, const float* forced_w,
                                       const volatile int* mtab, int* dtab, volatile int* log,
                                       const int* pos, volatile unsigned long long* stall, int* err, int A,
                                       long long timeout_ns, volatile int* progress, int layer,
                                       const float* pred, int n_pred) {
    const int lane = threadIdx.x;            // one warp; A <= 32
    int e = -1;
    if (lane == 0) *progress = 2 * layer;    // the previous layer's kernels are done: its claim ends
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
    for (int k = lane; k < n_pred; k += 32)  // later layers' router logits (pre-gate), as bits
        log[A + 1 + k] = __float_as_int(pred[k]);
    __threadfence_system();                  // all of it reaches the host before the sequence number
    __syncwarp();
    if (lane == 0) log[A] = pos[0] + 1;
    const unsigned long long t0 = now_ns();
    bool waited = false, late = false;
    int s = -1;
    for (;;) {
        if (lane < A) {                      // phase A: wait until every slot is published
            s = mtab[e];
            while (s < 0 && !late) {
                waited = true;
                __nanosleep(500);
                s = mtab[e];
                late = (long long)(now_ns() - t0) > timeout_ns;
            }
        }
        if (__any_sync(0xffffffffu, late)) {
            if (lane == 0) atomicOr(err, 2);
            s = -1;                          // the MoE kernels then flag the layer and yield zeros
            break;
        }
        if (lane == 0) *progress = 2 * layer + 1;     // phase B: claim, then read again
        __threadfence_system();
        __syncwarp();
        if (lane < A) s = mtab[e];
        if (__all_sync(0xffffffffu, lane >= A || s >= 0)) break;
        if (lane == 0) *progress = 2 * layer;         // an eviction raced the claim: wait again
        __threadfence();
    }
    if (lane < A) dtab[e] = s;
    waited = __any_sync(0xffffffffu, waited);
    if (lane == 0 && waited)
        *stall += now_ns() - t0;             // gates run one at a time (one stream): no atomic,
}                                            // which host memory over PCIe may not support

// One int written after everything queued before it on this stream (the copy stream): the slot
// number of an expert whose bytes just landed, into the host map.
extern "C" __global__ void publish(volatile int* dst, int value) {
    __threadfence_system();
    *dst = value;
    __threadfence_system();
}

// The end of a step: no layer's kernels read slots any more (until the next step's first gate).
extern "C" __global__ void step_done(volatile int* progress) {
    *progress = -1;
}

// Queued on the copy stream before a copy into a slot whose previous expert belongs to model
// layer `layer`: waits while that layer holds a claim (see the top of this file).
extern "C" __global__ void slot_guard(const volatile int* progress, int layer, int* err, long long timeout_ns) {
    const unsigned long long t0 = now_ns();
    while (*progress == 2 * layer + 1) {
        __nanosleep(200);
        if ((long long)(now_ns() - t0) > timeout_ns) {
            atomicOr(err, 4);
            break;
        }
    }
}
