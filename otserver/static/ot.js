/* otserver browser tracker: placeholder, replaced by the real tracker. */
