// The persistent pool behind parallel_for.
//
// Workers are std::threads that sleep on a condition variable between jobs, so an idle pool
// costs nothing and never spins against torch's own threads. One job runs at a time: a
// second caller (another Python thread, the GIL being released) that finds the pool busy runs
// its tasks on its own thread instead of waiting. Tasks are handed out by an atomic counter;
// results never depend on which thread ran which task. After fork() the child has none of the
// parent's threads, so a pool created in another process is abandoned and a new one started.
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common.h"

namespace dct_cpu {
namespace {

class Pool {
 public:
  explicit Pool(pid_t owner) : owner_(owner) {}
  pid_t owner() const { return owner_; }

  // Runs the job with `helpers` workers besides the caller; false when the pool is busy.
  bool run(int helpers, int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> job_lock(job_mutex_, std::try_to_lock);
    if (!job_lock.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < helpers) {
        const int id = static_cast<int>(workers_.size());
        workers_.emplace_back([this, id] { work(id); });
      }
      fn_ = &fn;
      tasks_ = tasks;
      next_.store(0);
      wanted_ = helpers;
      running_ = helpers;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    std::exception_ptr mine = drain(fn);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return running_ == 0; });
    fn_ = nullptr;
    std::exception_ptr error = mine ? mine : error_;
    lock.unlock();
    if (error) std::rethrow_exception(error);
    return true;
  }

 private:
  std::exception_ptr drain(const std::function<void(int64_t)>& fn) {
    std::exception_ptr error;
    for (int64_t t = next_.fetch_add(1); t < tasks_; t = next_.fetch_add(1)) {
      try {
        fn(t);
      } catch (...) {
        if (!error) error = std::current_exception();
        next_.store(tasks_);  // start no further tasks
      }
    }
    return error;
  }

  void work(int id) {
    uint64_t seen = 0;
    while (true) {
      const std::function<void(int64_t)>* fn;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen && id < wanted_; });
        seen = generation_;
        fn = fn_;
      }
      std::exception_ptr error = drain(*fn);
      std::lock_guard<std::mutex> lock(mutex_);
      if (error && !error_) error_ = error;
      if (--running_ == 0) done_.notify_one();
    }
  }

  const pid_t owner_;
  std::mutex job_mutex_;  // one job at a time
  std::mutex mutex_;      // guards the fields below
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int wanted_ = 0;
  int running_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
};

std::mutex pool_mutex;
Pool* pool = nullptr;  // never destroyed: its threads sleep until the process exits

Pool* current_pool() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  const pid_t me = getpid();
  if (pool == nullptr || pool->owner() != me) pool = new Pool(me);  // the old one: another process's
  return pool;
}

}  // namespace

void parallel_for(int threads, int64_t tasks, const std::function<void(int64_t)>& fn) {
  if (tasks <= 0) return;
  const int64_t helpers = min64(threads, tasks) - 1;
  if (helpers <= 0 || !current_pool()->run(static_cast<int>(helpers), tasks, fn)) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
  }
}

const char* keep_message(const char* what) {
  thread_local std::string message;
  message = what ? what : "";
  return message.c_str();
}

}  // namespace dct_cpu
