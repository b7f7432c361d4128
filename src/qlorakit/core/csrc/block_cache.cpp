// A bounded cache of large CPU blocks, installed as torch's CPU allocator (see qlorakit/core/memory.py).
//
// Why: a training step allocates and frees thousands of activation and dequantization tensors of 1-30 MB,
// the same sizes every step. glibc either keeps freed heap memory resident (its default: peak RSS ~35%
// above the live tensors) or, with a fixed mmap threshold, maps fresh zeroed pages for every tensor
// (one page fault per 4 KiB, measured ~1M faults and +100% step time on a 168M model). This allocator
// gives every block of `threshold` bytes or more its own mapping, like the fixed threshold, but keeps
// freed blocks in a cache keyed by size class and hands them out again, so a steady step re-faults
// almost nothing. The cache holds at most `cap` bytes of free blocks; past that the least recently freed
// blocks are unmapped, so the resident set stays within `cap` of the live tensors. Smaller requests go
// to the allocator that was installed before (torch's default).
//
// Size classes: requests are rounded up to 1/8 of their power of two (at most 12.5% larger, never
// touched beyond the request, so the rounding costs address space, not resident memory), which lets
// tensors whose shapes vary a little from step to step (padding to the longest row) share blocks.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

struct Block {
  void* ptr;
  size_t size;
};

size_t size_class(size_t n) {
  size_t top = size_t(1) << (63 - __builtin_clzll(static_cast<unsigned long long>(n)));
  size_t step = top >= (size_t(8) << 12) ? top / 8 : size_t(4096);
  return (n + step - 1) / step * step;
}

class BlockCache final : public c10::Allocator {
 public:
  BlockCache(c10::Allocator* fallback, size_t threshold, size_t cap)
      : fallback_(fallback), threshold_(threshold), cap_(cap) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < threshold_) return fallback_->allocate(n);
    size_t size = size_class(n);
    void* ptr = take(size);
    if (ptr == nullptr) {
      ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (ptr == MAP_FAILED) {
        trim();  // give back what the cache holds, then try once more
        ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        TORCH_CHECK(ptr != MAP_FAILED, "qlorakit block cache: out of memory mapping ", size, " bytes");
      }
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[ptr] = size;
      mapped_ += size;
      ++maps_;
    }
    return {ptr, ptr, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate/raw_deallocate (oneDNN scratch buffers) free through this one function, whichever
  // allocator served the request, so it must recognise our blocks and pass the rest on.
  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::raw_release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  // Unmap every cached (free) block.
  void trim() {
    std::lock_guard<std::mutex> lock(mu_);
    while (!lru_.empty()) evict_oldest();
  }

  void set_cap(size_t cap) {
    std::lock_guard<std::mutex> lock(mu_);
    cap_ = cap;
    while (cached_ > cap_ && !lru_.empty()) evict_oldest();
  }

  void stats(int64_t* out) {
    std::lock_guard<std::mutex> lock(mu_);
    out[0] = static_cast<int64_t>(mapped_);
    out[1] = static_cast<int64_t>(cached_);
    out[2] = static_cast<int64_t>(hits_);
    out[3] = static_cast<int64_t>(maps_);
  }

  static BlockCache* instance;

 private:
  static void release(void* ptr) { instance->give_back(ptr); }

  static void raw_release(void* ptr) {
    if (instance->owns(ptr)) {
      instance->give_back(ptr);
    } else {
      instance->fallback_->raw_deleter()(ptr);
    }
  }

  bool owns(void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    return sizes_.count(ptr) != 0;
  }

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(size);
    if (it == free_.end() || it->second.empty()) return nullptr;
    auto node = it->second.back();  // the most recently freed: likeliest still in cache and TLB
    it->second.pop_back();
    void* ptr = node->ptr;
    lru_.erase(node);
    cached_ -= size;
    ++hits_;
    return ptr;
  }

  void give_back(void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t size = sizes_.at(ptr);
    lru_.push_back({ptr, size});
    free_[size].push_back(std::prev(lru_.end()));
    cached_ += size;
    while (cached_ > cap_ && !lru_.empty()) evict_oldest();
  }

  // Caller holds mu_.
  void evict_oldest() {
    Block b = lru_.front();
    auto& list = free_[b.size];
    for (auto it = list.begin(); it != list.end(); ++it) {
      if ((*it)->ptr == b.ptr) {
        list.erase(it);
        break;
      }
    }
    lru_.pop_front();
    munmap(b.ptr, b.size);
    sizes_.erase(b.ptr);
    cached_ -= b.size;
    mapped_ -= b.size;
  }

  c10::Allocator* fallback_;
  size_t threshold_;
  size_t cap_;
  std::mutex mu_;
  std::list<Block> lru_;  // free blocks, least recently freed first
  std::unordered_map<size_t, std::vector<std::list<Block>::iterator>> free_;
  std::unordered_map<void*, size_t> sizes_;  // every block this allocator mapped, live or free
  size_t mapped_ = 0, cached_ = 0, hits_ = 0, maps_ = 0;
};

BlockCache* BlockCache::instance = nullptr;

}  // namespace

extern "C" {

// Install once (later calls only change the cap); returns 1 when installed by this call, 0 when it was already.
int qlk_block_cache_install(int64_t threshold, int64_t cap) {
  if (BlockCache::instance != nullptr) {
    BlockCache::instance->set_cap(static_cast<size_t>(cap));
    return 0;
  }
  // Never deleted: tensors allocated by it may outlive any owner, so it lives as long as the process.
  BlockCache::instance =
      new BlockCache(c10::GetCPUAllocator(), static_cast<size_t>(threshold), static_cast<size_t>(cap));
  c10::SetCPUAllocator(BlockCache::instance, /*priority=*/10);
  return 1;
}

// out[4]: bytes mapped (live + cached), bytes cached (free), cache hits, fresh mappings. 0 if not installed.
int qlk_block_cache_stats(int64_t* out) {
  if (BlockCache::instance == nullptr) return 0;
  BlockCache::instance->stats(out);
  return 1;
}

void qlk_block_cache_trim() {
  if (BlockCache::instance != nullptr) BlockCache::instance->trim();
}

}  // extern "C"
