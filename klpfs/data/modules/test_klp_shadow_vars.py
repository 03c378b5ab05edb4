# lib/livepatch/test_klp_shadow_vars.c (Linux 6.1; tools/testing/selftests/livepatch/test_modules/ in 6.12),
# transliterated: a module that exercises the shadow variable API.
#
# Pointers: what C takes the address of is an object with an address here
# (a kzalloc'd block, `Mem`): `&objs[i]` is objs[i], `&nfields1[i]` is
# nfields1[i], and a pointer variable whose address is passed on
# (`&pnfields1[i]`) is a block whose `.value` holds the pointer.  Comparing
# two pointers is `is`.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

# Keep a small list of pointers so that we can print address-agnostic
# pointer values.  Use a rolling integer count to differentiate the values.
# Ironically we could have used the shadow variable API to do this, but
# let's not lean too heavily on the very code we're testing.
ptr_list = LIST_HEAD()
# struct shadow_ptr {
#	void *ptr;
#	int id;
#	struct list_head list;
# };
SIZEOF_SHADOW_PTR = 32


def free_ptr_list():
    # list_for_each_entry_safe(sp, tmp_sp, &ptr_list, list)
    for sp in list(ptr_list):
        ptr_list.remove(sp)
        kfree(sp)


# static int count; (ptr_id()'s)
count = 0


def ptr_id(ptr):
    global count

    for sp in ptr_list:
        if sp.ptr is ptr:
            return sp.id

    sp = kmalloc(SIZEOF_SHADOW_PTR, GFP_ATOMIC)
    if not sp:
        return -ENOMEM
    sp.ptr = ptr
    sp.id = count
    count += 1

    ptr_list.insert(0, sp)  # list_add(&sp->list, &ptr_list)

    return sp.id


# Shadow variable wrapper functions that echo the function and arguments
# to the kernel log for testing verification.  Don't display raw pointers,
# but use the ptr_id() value instead.
def shadow_get(obj, id):
    sv = klp_shadow_get(obj, id)
    pr_info("klp_%s(obj=PTR%d, id=0x%lx) = PTR%d\n",
            __func__, ptr_id(obj), id, ptr_id(sv))

    return sv


def shadow_alloc(obj, id, size, gfp_flags, ctor, ctor_data):
    var = ctor_data

    sv = klp_shadow_alloc(obj, id, size, gfp_flags, ctor, var)
    # %pGg is given &gfp_flags and reads the flags through it
    pr_info("klp_%s(obj=PTR%d, id=0x%lx, size=%zx, gfp_flags=%pGg), ctor=PTR%d, ctor_data=PTR%d = PTR%d\n",
            __func__, ptr_id(obj), id, size, gfp_flags, ptr_id(ctor),
            ptr_id(var.value), ptr_id(sv))

    return sv


def shadow_get_or_alloc(obj, id, size, gfp_flags, ctor, ctor_data):
    var = ctor_data

    sv = klp_shadow_get_or_alloc(obj, id, size, gfp_flags, ctor, var)
    pr_info("klp_%s(obj=PTR%d, id=0x%lx, size=%zx, gfp_flags=%pGg), ctor=PTR%d, ctor_data=PTR%d = PTR%d\n",
            __func__, ptr_id(obj), id, size, gfp_flags, ptr_id(ctor),
            ptr_id(var.value), ptr_id(sv))

    return sv


def shadow_free(obj, id, dtor):
    klp_shadow_free(obj, id, dtor)
    pr_info("klp_%s(obj=PTR%d, id=0x%lx, dtor=PTR%d)\n",
            __func__, ptr_id(obj), id, ptr_id(dtor))


def shadow_free_all(id, dtor):
    klp_shadow_free_all(id, dtor)
    pr_info("klp_%s(id=0x%lx, dtor=PTR%d)\n", __func__, id, ptr_id(dtor))


# Shadow variable constructor - remember simple pointer data
def shadow_ctor(obj, shadow_data, ctor_data):
    sv = shadow_data
    var = ctor_data

    if not var:
        return -EINVAL

    sv.value = var.value  # *sv = *var
    pr_info("%s: PTR%d -> PTR%d\n", __func__, ptr_id(sv), ptr_id(var.value))

    return 0


# With more than one item to free in the list, order is not determined and
# shadow_dtor will not be passed to shadow_free_all() which would make the
# test fail. (see pass 6)
def shadow_dtor(obj, shadow_data):
    sv = shadow_data

    pr_info("%s(obj=PTR%d, shadow_data=PTR%d)\n",
            __func__, ptr_id(obj), ptr_id(sv))


# number of objects we simulate that need shadow vars
NUM_OBJS = 3

# dynamically created obj fields have the following shadow var id values
SV_ID1 = 0x1234
SV_ID2 = 0x1235

# The main test case adds/removes new fields (shadow var) to each of these
# test structure instances. The last group of fields in the struct represent
# the idea that shadow variables may be added and removed to and from the
# struct during execution.
#
# struct test_object {
#	 /* add anything here below and avoid to define an empty struct */
#	struct shadow_ptr sp;
#
#	/* these represent shadow vars added and removed with SV_ID{1,2} */
#	/* char nfield1; */
#	/* int  nfield2; */
# };
SIZEOF_TEST_OBJECT = SIZEOF_SHADOW_PTR
SIZEOF_POINTER = 8


def test_klp_shadow_vars_init():
    # The locals of the C function, each element an object with its own address.
    objs = [kzalloc(SIZEOF_TEST_OBJECT) for _ in range(NUM_OBJS)]  # struct test_object objs[NUM_OBJS];
    nfields1 = [kzalloc(1) for _ in range(NUM_OBJS)]               # char nfields1[NUM_OBJS];
    pnfields1 = [kzalloc(SIZEOF_POINTER) for _ in range(NUM_OBJS)]  # char *pnfields1[NUM_OBJS];
    sv1 = [None] * NUM_OBJS                                          # char **sv1[NUM_OBJS];
    pndup = [kzalloc(SIZEOF_POINTER) for _ in range(NUM_OBJS)]     # char *pndup[NUM_OBJS];
    nfields2 = [kzalloc(4) for _ in range(NUM_OBJS)]               # int nfields2[NUM_OBJS];
    pnfields2 = [kzalloc(SIZEOF_POINTER) for _ in range(NUM_OBJS)]  # int *pnfields2[NUM_OBJS];
    sv2 = [None] * NUM_OBJS                                          # int **sv2[NUM_OBJS];

    def out(ret):
        # the `out:` label
        shadow_free_all(SV_ID1, NULL)  # 'char' pairs
        shadow_free_all(SV_ID2, NULL)  # 'int' pairs
        free_ptr_list()

        return ret

    ptr_id(NULL)

    # With an empty shadow variable hash table, expect not to find
    # any matches.
    sv = shadow_get(objs[0], SV_ID1)
    if not sv:
        pr_info("  got expected NULL result\n")

    # pass 1: init & alloc a char+int pair of svars for each objs
    for i in range(NUM_OBJS):
        pnfields1[i].value = nfields1[i]  # pnfields1[i] = &nfields1[i];
        ptr_id(pnfields1[i].value)

        if i % 2:
            sv1[i] = shadow_alloc(objs[i], SV_ID1,
                                  sizeof(pnfields1[i]), GFP_KERNEL,
                                  shadow_ctor, pnfields1[i])
        else:
            sv1[i] = shadow_get_or_alloc(objs[i], SV_ID1,
                                         sizeof(pnfields1[i]), GFP_KERNEL,
                                         shadow_ctor, pnfields1[i])
        if not sv1[i]:
            ret = -ENOMEM
            return out(ret)  # goto out

        pnfields2[i].value = nfields2[i]  # pnfields2[i] = &nfields2[i];
        ptr_id(pnfields2[i].value)
        sv2[i] = shadow_alloc(objs[i], SV_ID2, sizeof(pnfields2[i]),
                              GFP_KERNEL, shadow_ctor, pnfields2[i])
        if not sv2[i]:
            ret = -ENOMEM
            return out(ret)  # goto out

    # pass 2: verify we find allocated svars and where they point to
    for i in range(NUM_OBJS):
        # check the "char" svar for all objects
        sv = shadow_get(objs[i], SV_ID1)
        if not sv:
            ret = -EINVAL
            return out(ret)  # goto out
        if sv is sv1[i] and sv1[i].value is pnfields1[i].value:
            pr_info("  got expected PTR%d -> PTR%d result\n",
                    ptr_id(sv1[i]), ptr_id(sv1[i].value))

        # check the "int" svar for all objects
        sv = shadow_get(objs[i], SV_ID2)
        if not sv:
            ret = -EINVAL
            return out(ret)  # goto out
        if sv is sv2[i] and sv2[i].value is pnfields2[i].value:
            pr_info("  got expected PTR%d -> PTR%d result\n",
                    ptr_id(sv2[i]), ptr_id(sv2[i].value))

    # pass 3: verify that 'get_or_alloc' returns already allocated svars
    for i in range(NUM_OBJS):
        pndup[i].value = nfields1[i]  # pndup[i] = &nfields1[i];
        ptr_id(pndup[i].value)

        sv = shadow_get_or_alloc(objs[i], SV_ID1, sizeof(pndup[i]),
                                 GFP_KERNEL, shadow_ctor, pndup[i])
        if not sv:
            ret = -EINVAL
            return out(ret)  # goto out
        if sv is sv1[i] and sv1[i].value is pnfields1[i].value:
            pr_info("  got expected PTR%d -> PTR%d result\n",
                    ptr_id(sv1[i]), ptr_id(sv1[i].value))

    # pass 4: free <objs[*], SV_ID1> pairs of svars, verify removal
    for i in range(NUM_OBJS):
        shadow_free(objs[i], SV_ID1, shadow_dtor)  # 'char' pairs
        sv = shadow_get(objs[i], SV_ID1)
        if not sv:
            pr_info("  got expected NULL result\n")

    # pass 5: check we still find <objs[*], SV_ID2> svar pairs
    for i in range(NUM_OBJS):
        sv = shadow_get(objs[i], SV_ID2)  # 'int' pairs
        if not sv:
            ret = -EINVAL
            return out(ret)  # goto out
        if sv is sv2[i] and sv2[i].value is pnfields2[i].value:
            pr_info("  got expected PTR%d -> PTR%d result\n",
                    ptr_id(sv2[i]), ptr_id(sv2[i].value))

    # pass 6: free all the <objs[*], SV_ID2> svar pairs too.
    shadow_free_all(SV_ID2, NULL)  # 'int' pairs
    for i in range(NUM_OBJS):
        sv = shadow_get(objs[i], SV_ID2)
        if not sv:
            pr_info("  got expected NULL result\n")

    free_ptr_list()

    return 0


def test_klp_shadow_vars_exit():
    pass


module_init(test_klp_shadow_vars_init)
module_exit(test_klp_shadow_vars_exit)
MODULE_LICENSE("GPL")
MODULE_AUTHOR("Joe Lawrence <joe.lawrence@redhat.com>")
MODULE_DESCRIPTION("Livepatch test: shadow variables")
