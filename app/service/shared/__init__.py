"""The job store shared by several replicas through Redis (``SEA_REDIS_URL``).

Any replica accepts a job and any replica answers for it; queued jobs go to whichever replica has room.
Redis holds the truth; each replica keeps local ``Job`` objects (the ones it runs, and mirrors of the
ones it was asked about) and brings mirrors up to date from Redis.

Keys, under the prefix P (``SEA_REDIS_PREFIX``):

- ``P:queue``: queued job ids, pushed on the left, taken from the right (first in, first out).
- ``P:job:{id}``: a hash: ``spec`` (JSON: messages, engine config, reward options), ``status``, ``owner``
  (the replica running it), ``attempts``, ``error``, ``error_kind``, ``result`` (JSON), ``created``, and
  ``cancel`` (JSON kind and reason) once a replica that does not run it was asked to cancel it while it ran.
- ``P:events:{id}``: the job's events (JSON, the same ones the local SSE stream sends), in order.
- ``P:claimed:{replica}``: ids a replica has taken. A replica takes a job by moving its id from the queue
  to its claimed list in one command (BLMOVE), so a job is always in one of the two lists until it ends.
- ``P:alive:{replica}``: the replica's lease, renewed every third of ``SEA_REPLICA_LEASE_SECONDS``;
  ``P:replicas``: replicas that may hold claimed jobs. When a lease lapses, any replica puts the dead
  one's running jobs back in the queue (or fails them after ``SEA_JOB_MAX_ATTEMPTS`` starts, or ends them as
  their ``cancel`` flag asks).
- Channels ``P:wake`` (a job id whose events grew) and ``P:cancel`` (a job to stop where it runs).

Every change of a job's state is one Lua script (``records.py``), so two replicas never both finish, requeue or fail
the same job, and a result from a replica that lost its lease (a long pause) is dropped, not written.
Pub/sub only wakes replicas up; a periodic poll catches anything a lost message would have missed (a running job's
``cancel`` flag, a mirror's new events).

The modules: ``store.py``, the :class:`SharedJobs` object (its life cycle; submitting, reading and cancelling jobs;
leases and the reaper) built from ``mirrors.py`` (local copies of jobs that run elsewhere, brought up to date from
Redis) and ``runs.py`` (claiming jobs from the queue and writing the events of those that run here); ``records.py``
(what replicas write to Redis: the Lua scripts, the JSON of a job's config and result); ``faults.py`` (Redis's
errors, and an outage as each loop logs it).
"""

from app.service.shared.faults import RedisError, unreachable
from app.service.shared.store import SharedJobs

__all__ = ["RedisError", "SharedJobs", "unreachable"]
