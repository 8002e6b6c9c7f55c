// Probe: how fast can host threads move a snapshot file's bytes (in the page cache, as after
// a save) through page-locked slots to the GPU? Not part of Tern: a measurement for choosing
// how a restore reads its file (`crates/model/src/llama/cuda/staging.rs`).
//
//   nvcc -O3 -std=c++17 -o /tmp/restore-read scripts/probes/restore-read.cu -lpthread && /tmp/restore-read [MB]
//
// Each way reads the whole file in 4 MiB jobs taken in order by T threads; a thread has its
// own write-combined page-locked slot and stream, fills the slot with a job's bytes (each
// 64 KiB block summed first, standing in for the checksum that reads it), copies it to the
// device and waits for that copy before it refills the slot.
//   map      copy from a fresh mapping of the file (pages faulted in by the copy): today's way
//   mapped   copy from a mapping whose pages are already in the process (the bound of a copy)
//   pread    pread each 64 KiB block into a cached buffer, sum it, copy it into the slot
//   direct   pread each job straight into the slot (no sum: reading a write-combined slot
//            back is slow), the bound of a read into slots
//   cached   pread each 64 KiB block straight into a slot that is not write-combined, then
//            sum it there while it is in cache
//   ring     as map, but into a ring of R small page-locked slots of S bytes a thread, each
//            copied to the device as soon as it is full (an event a slot, waited on before
//            the slot is refilled), so that the slots stay in the host's caches and the GPU's
//            reads of them need not reach its memory; cached (ring-c) or write-combined
//            (ring-wc) slots
#include <cuda_runtime.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "probe.cuh"

constexpr size_t JOB = 4 << 20, BLOCK = 64 << 10;

static unsigned long long sum_block(const unsigned char* p, size_t n)
{
    unsigned long long s = 0;
    const unsigned long long* q = (const unsigned long long*)p;
    for (size_t i = 0; i < n / 8; ++i) s += q[i] * 0x9e3779b97f4a7c15ull;
    return s;
}

enum Way { MAP, MAPPED, PREAD, DIRECT, CACHED, RING_C, RING_WC };
static const char* names[] = {"map", "mapped", "pread", "direct", "cached", "ring-c", "ring-wc"};

// The ring's slots: R of S bytes a thread.
constexpr size_t RING_MAX = 4 << 20;
static size_t ring_s = 256 << 10, ring_r = 4;

struct Worker {
    unsigned char* slot;
    unsigned char* plain;  // not write-combined
    cudaStream_t stream;
    unsigned char* ring_c;   // RING_MAX bytes, cached
    unsigned char* ring_wc;  // RING_MAX bytes, write-combined
    cudaEvent_t copied[64];
    bool pending[64];
    unsigned char bounce[BLOCK] __attribute__((aligned(64)));
};

static double run(Way way, int threads, int fd, size_t len, unsigned char* dev, std::vector<Worker*>& workers,
                  unsigned long long* check)
{
    const unsigned char* map = nullptr;
    if (way == MAP || way == MAPPED || way == RING_C || way == RING_WC) {
        map = (const unsigned char*)mmap(nullptr, len, PROT_READ, MAP_PRIVATE | (way == MAPPED ? MAP_POPULATE : 0), fd, 0);
        if (map == MAP_FAILED) {
            perror("mmap");
            exit(1);
        }
    }
    std::atomic<size_t> next{0};
    std::atomic<unsigned long long> total{0};
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int w = 0; w < threads; ++w)
        pool.emplace_back([&, w] {
            Worker* me = workers[w];
            unsigned long long s = 0;
            for (;;) {
                const size_t j = next.fetch_add(1);
                const size_t at = j * JOB;
                if (at >= len) break;
                const size_t n = std::min(JOB, len - at);
                if (way == RING_C || way == RING_WC) {
                    unsigned char* ring = way == RING_C ? me->ring_c : me->ring_wc;
                    // Job offsets o go to slot (o / S) % R; a slot is sent once full.
                    for (size_t b = 0; b < n; b += BLOCK) {
                        const size_t m = std::min(BLOCK, n - b);
                        s += sum_block(map + at + b, m);
                        for (size_t o = b; o < b + m;) {
                            const size_t k = (o / ring_s) % ring_r, in = o % ring_s;
                            if (in == 0 && me->pending[k]) {
                                CK(cudaEventSynchronize(me->copied[k]));
                                me->pending[k] = false;
                            }
                            const size_t c = std::min(ring_s - in, b + m - o);
                            memcpy(ring + k * ring_s + in, map + at + o, c);
                            o += c;
                            if (o % ring_s == 0 || o == n) {
                                const size_t from = o - (in + c);
                                CK(cudaMemcpyAsync(dev + at + from, ring + k * ring_s, o - from,
                                                   cudaMemcpyHostToDevice, me->stream));
                                CK(cudaEventRecord(me->copied[k], me->stream));
                                me->pending[k] = true;
                            }
                        }
                    }
                    continue;
                }
                for (size_t b = 0; b < n; b += BLOCK) {
                    const size_t m = std::min(BLOCK, n - b);
                    if (way == DIRECT) {
                        if (pread(fd, me->slot + b, m, at + b) != (ssize_t)m) exit(2);
                        continue;
                    }
                    if (way == CACHED) {
                        if (pread(fd, me->plain + b, m, at + b) != (ssize_t)m) exit(2);
                        s += sum_block(me->plain + b, m);
                        continue;
                    }
                    const unsigned char* src = map ? map + at + b : me->bounce;
                    if (!map && pread(fd, me->bounce, m, at + b) != (ssize_t)m) exit(2);
                    s += sum_block(src, m);
                    memcpy(me->slot + b, src, m);
                }
                CK(cudaMemcpyAsync(dev + at, way == CACHED ? me->plain : me->slot, n, cudaMemcpyHostToDevice, me->stream));
                CK(cudaStreamSynchronize(me->stream));
            }
            if (way == RING_C || way == RING_WC) {
                CK(cudaStreamSynchronize(me->stream));
                for (int k = 0; k < 64; ++k) me->pending[k] = false;
            }
            total += s;
        });
    for (auto& t : pool) t.join();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (map) munmap((void*)map, len);
    *check = total;
    return ms;
}

int main(int argc, char** argv)
{
    const size_t len = (size_t)(argc > 1 ? atof(argv[1]) : 94.6) * 1e6 / 4096 * 4096;
    const char* path = "/tmp/restore-read.bin";
    std::vector<unsigned char> bytes(len), back(len);
    {
        unsigned long long x = 88172645463325252ull;
        for (size_t i = 0; i < len; i += 8) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            memcpy(&bytes[i], &x, 8);
        }
        FILE* f = fopen(path, "wb");
        fwrite(bytes.data(), 1, len, f);
        fclose(f);
    }
    const int fd = open(path, O_RDONLY);
    unsigned char* dev;
    CK(cudaMalloc(&dev, len));
    std::vector<Worker*> workers;
    for (int w = 0; w < 32; ++w) {
        Worker* me = new Worker;
        CK(cudaHostAlloc(&me->slot, JOB, cudaHostAllocWriteCombined));
        CK(cudaHostAlloc(&me->plain, JOB, 0));
        CK(cudaStreamCreateWithFlags(&me->stream, cudaStreamNonBlocking));
        CK(cudaHostAlloc(&me->ring_c, RING_MAX, 0));
        CK(cudaHostAlloc(&me->ring_wc, RING_MAX, cudaHostAllocWriteCombined));
        for (int k = 0; k < 64; ++k) {
            CK(cudaEventCreateWithFlags(&me->copied[k], cudaEventDisableTiming));
            me->pending[k] = false;
        }
        workers.push_back(me);
    }
    // The bus: one page-locked copy of the whole file's size.
    unsigned char* pinned;
    CK(cudaHostAlloc(&pinned, len, 0));
    memset(pinned, 1, len);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float bus_ms = 1e9;
    for (int r = 0; r < 5; ++r) {
        CK(cudaEventRecord(e0));
        CK(cudaMemcpyAsync(dev, pinned, len, cudaMemcpyHostToDevice));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        bus_ms = std::min(bus_ms, ms);
    }
    printf("file %.1f MB in the page cache; bus %.1f GB/s (%.2f ms for the file); %u host threads\n", len / 1e6,
           len / bus_ms / 1e6, bus_ms, std::thread::hardware_concurrency());
    printf("%-18s %4s %28s\n", "way", "threads", "ms (each of 5 rounds)");
    const int counts[] = {8, 16};
    unsigned long long want = 0;
    // The ring's shapes: S bytes, R slots.
    const size_t shapes[][2] = {{64 << 10, 4}, {256 << 10, 2}, {256 << 10, 4}, {1 << 20, 4}};
    struct Case {
        Way way;
        size_t s, r;
    };
    std::vector<Case> cases = {{MAP, 0, 0}, {MAPPED, 0, 0}};
    for (auto& sh : shapes) cases.push_back({RING_C, sh[0], sh[1]});
    for (auto& sh : shapes) cases.push_back({RING_WC, sh[0], sh[1]});
    cases.push_back({MAP, 0, 0});
    for (int threads : counts)
        for (const Case& cs : cases) {
            const Way way = cs.way;
            ring_s = cs.s, ring_r = cs.r;
            char label[32];
            if (cs.s) snprintf(label, sizeof label, "%s %zuK x%zu", names[way], cs.s >> 10, cs.r);
            else snprintf(label, sizeof label, "%s", names[way]);
            printf("%-18s %4d  ", label, threads);
            std::vector<double> ms;
            for (int r = 0; r < 5; ++r) {
                unsigned long long check;
                ms.push_back(run((Way)way, threads, fd, len, dev, workers, &check));
                if (way != DIRECT) {
                    if (!want) want = check;
                    if (check != want) printf("(sum differs) ");
                }
            }
            if (way == RING_C || way == RING_WC) {
                CK(cudaMemcpy(back.data(), dev, len, cudaMemcpyDeviceToHost));
                if (memcmp(back.data(), bytes.data(), len)) printf("(device bytes differ) ");
                CK(cudaMemset(dev, 0, len));
            }
            for (double m : ms) printf(" %6.2f", m);
            std::sort(ms.begin(), ms.end());
            printf("   median %6.2f ms, %5.1f GB/s, %.2fx the bus\n", ms[2], len / ms[2] / 1e6, ms[2] / bus_ms);
        }
    unlink(path);
    return 0;
}
